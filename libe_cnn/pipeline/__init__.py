"""Model parallelism (--parallelism pipeline): consecutive layers on consecutive workers.

With -n N and --stages K the run has N/K replicas of a K-stage pipeline. Worker w is stage
w % K of replica w // K; each replica trains on its own shard of the data, its batch cut into
--microbatches M micro-batches that flow forward stage to stage and their gradients back
(schedule.py says in which order), through the store. The generator holds the whole parent
model and its optimizer as in sync: each stage sends the gradient of its own parameters, the
generator reduces each stage's over the replicas in shard order, steps, and publishes each
stage's new parameters to that stage's workers only.

    schedule.py  the order of each stage's forwards and backwards (GPipe, 1F1B)
    split.py     where the model is cut into stages (balanced by time or parameters, or given)
    handoff.py   the activations and their gradients between neighbouring stages, through the store
"""
