"""The parent-model generator: a persistent libEnsemble generator on the manager.

It holds the parent model and runs the chosen strategy's generator loop (libe_cnn/strategies):
sync and async have loops of their own; the periodic strategies share `GenRun.rounds`, in
which workers take local steps and the generator combines their parameters every round.

    python run_libe_cnn.py -n 4 --strategy easgd     (runs this on the manager)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import redis
import torch
from libensemble.message_numbers import EVAL_GEN_TAG, FINISHED_PERSISTENT_GEN_TAG
from libensemble.tools.persistent_support import PersistentSupport

from gen_funcs.messaging import Messenger, RunAborted
from gen_funcs.outcome import Outcome
from gen_funcs.parent import ParentModel
from gen_funcs.records import LoopState, Recorder
from libe_cnn.checkpoint import load_checkpoint
from libe_cnn.errors import CannotWrite
from libe_cnn.liveness import LivenessCheck
from libe_cnn.plan import RunPlan, plan_from_user, resume_key
from libe_cnn.runtime import gpu_count, lower_manager_loop_priority, select_device, set_threads
from libe_cnn.store import ServerGroup, TensorStore
from libe_cnn.strategies.base import Periodic
from mnist.data import load_split


class GenRun:
    """One run on the manager: the parent, the store, and the jobs the strategies' loops use.

    Messages (send, receive, gather, fetch, screen) are the Messenger's; metrics and
    evaluations (record, evaluate) the Recorder's; checkpoints and the summary (checkpoint,
    completed, finish) the Outcome's. `state` holds the loop's running values.
    """

    def __init__(self, plan: RunPlan, gen_specs: dict, libE_info: dict) -> None:
        cfg = plan.config
        self.plan, self.cfg, self.n, self.strategy = plan, cfg, cfg.n_workers, plan.strategy
        self.total_steps = plan.recorded_steps
        # The generator works while the simulators compute (one thread: a team of threads would stall
        # on every core the simulators hold); only its evaluations use every core.
        set_threads(1)
        lower_manager_loop_priority()
        self.parent = ParentModel(cfg, torch.device(select_device(cfg.gen_device, 0, gpu_count())))
        self.store = TensorStore(plan.redis, cfg.run_id, plan.shm_dir)
        self.servers = ServerGroup(plan.servers, cfg.run_id, plan.homes, plan.shm_dir)  # where the streamed exchange spreads its data
        self.liveness = LivenessCheck(plan.redis, cfg.run_id, self.n)
        self.messages = Messenger(cfg, PersistentSupport(libE_info, EVAL_GEN_TAG), self.store, self.liveness,
                                  gen_specs["out"])
        # Resuming: the parent, the loop's state, the metrics and the clock continue from the checkpoint.
        self.resumed = load_checkpoint(Path(cfg.run_dir)) if cfg.resume else None
        if self.resumed is not None:
            self.parent.restore(self.resumed)
        self.state = LoopState.restored(plan, self.resumed) if self.resumed else LoopState.fresh(plan)
        start = time.perf_counter() - (self.resumed["wall_s"] if self.resumed else 0.0)
        test_set = load_split(plan.files, train=False, limit=cfg.limit_test)
        self.recorder = Recorder(plan, self.parent, self.state, test_set,
                                 self.resumed["metrics_lines"] if self.resumed else None, start)
        self.outcome = Outcome(plan, self.parent, self.state, self.recorder, self.resumed)
        m, r, o = self.messages, self.recorder, self.outcome
        self.send, self.receive, self.gather, self.fetch, self.screen = m.send, m.receive, m.gather, m.fetch, m.screen
        self.record, self.evaluate, self.eval_due, self.evaluate_parameters = (
            r.record, r.evaluate, r.eval_due, r.evaluate_parameters)
        self.checkpoint, self.completed, self.checkpoint_due, self.finish = (
            o.checkpoint, o.completed, o.checkpoint_due, o.finish)

    def stops_at(self, step: int) -> bool:
        """Whether the run evaluates or checkpoints after `step`: where rounds and batches are cut."""
        return self.eval_due(step) or self.checkpoint_due(step)

    def evaluate_and_checkpoint_if_due(self, step: int) -> None:
        if self.eval_due(step):
            self.evaluate()
        if self.checkpoint_due(step):
            self.outcome.checkpoint_completed()

    def rounds(self, strategy: Periodic) -> None:
        """The periodic strategies: rounds of local steps, then the strategy combines the results.

        Rounds last --sync-period steps (or what the strategy says), cut short at every
        evaluation point, so that all strategies are evaluated at the same steps, and at every
        checkpoint, where the workers send their own state too.
        """
        plan, n, parent, state, cfg = self.plan, self.n, self.parent, self.state, self.cfg

        def start_round(start: int) -> tuple[int, list[str]]:
            """Send every worker its next round; returns the round's length and the keys put for it."""
            end, limit = start + 1, strategy.round_end_limit(cfg, start, plan.total_steps)
            while end < limit and not self.stops_at(end):
                end += 1
            params_key, peers_key = strategy.round_keys(self, start, state.counters.exchanges)
            self.send(n, start, n_steps=end - start, params_key=params_key, peers_key=peers_key,
                      checkpoint=self.checkpoint_due(end))
            state.counters.exchanges += start > 0 and strategy.exchanges
            return end - start, [k for k in (params_key, peers_key) if k]

        sent = self.put_worker_states(strategy) if self.resumed else []
        n_steps, keys = start_round(state.step)
        sent += keys
        while state.step < plan.total_steps:
            end = state.step + n_steps
            evaluate_now = self.eval_due(end)
            got = self.gather(fetch=strategy.combines_every_round or evaluate_now, evict=not strategy.keeps_results())
            if got is None:
                break
            # Every worker has now used what it was sent last round.
            self.store.evict(sent)
            sent = [str(k) for k in got.rows["result_key"]] if strategy.keeps_results() else []
            t2 = time.perf_counter()
            if got.results is not None:
                self.screen(got.results, got.rows["shard"], end, "parameters")
                strategy.update_parent(cfg, parent, got.results)
            t3 = time.perf_counter()
            state.advance(n_steps, int(got.rows["n_samples"].sum()), float(got.rows["loss"].mean()),
                          plan.steps_per_epoch)
            state.positions = [state.step] * n
            self.completed()  # what the next round starts from, for a checkpoint at this step
            if state.step < plan.total_steps:
                n_steps, keys = start_round(state.step)
                sent += keys
            t4 = time.perf_counter()
            self.record(got.rows, gen_wait_s=got.wait_s, fetch_s=got.fetch_s, update_s=t3 - t2, publish_s=t4 - t3)
            if evaluate_now:
                self.evaluate(**(strategy.final_evaluation(self, got.results) if state.step == plan.total_steps else {}))
            if self.checkpoint_due(state.step):  # the workers sent their state with this round's rows
                state_keys = [str(k) for k in got.rows["state_key"]]
                states = self.store.get_many(state_keys)
                self.store.evict(state_keys)
                self.outcome.checkpoint_completed(workers=states)
        # A run stopped mid-round keeps its last checkpoint: the workers' states are not here. Its
        # workers may still be reading what their round was sent: the run's end deletes that.
        if state.step == plan.total_steps:
            self.store.evict(sent)
        self.finish(exchanges=state.counters.exchanges)

    def put_worker_states(self, strategy: Periodic) -> list[str]:
        """Resuming: each worker's own state, and whatever else the strategy's first round reads."""
        keys = []
        for shard, saved in enumerate(self.resumed["workers"]):
            keys.append(self.store.put(saved.numpy(), resume_key(shard)))
            keys += strategy.resume_puts(self, self.state.step, shard, saved)
        return keys

    def close(self) -> None:
        self.recorder.close()
        self.store.close()
        self.servers.close()
        self.liveness.close()


def failure_reason(error: Exception) -> str:
    """One line for summary.json on why the run could not go on."""
    if isinstance(error, (RunAborted, CannotWrite)):
        return str(error)
    if isinstance(error, (redis.ConnectionError, redis.TimeoutError)):
        return f"lost the connection to Redis: {error}"
    return f"{type(error).__name__}: {error}"


def parent_model_gen(H, persis_info, gen_specs, libE_info):
    plan = plan_from_user(gen_specs["user"])
    summary = Path(plan.config.run_dir) / "summary.json"
    if summary.exists() and json.loads(summary.read_text()).get("run_id") == plan.config.run_id:
        # libEnsemble restarts a generator that ended while simulators were still busy;
        # fail loudly rather than start the run over on top of its own results.
        raise RuntimeError("the generator was started a second time after the run had finished")
    run = GenRun(plan, gen_specs, libE_info)
    try:
        plan.strategy.run_generator(run)
    except Exception as e:  # whatever ended it, what the run had is kept and the reason written down
        run.outcome.abandon(failure_reason(e))
        raise
    finally:
        run.close()
    return None, persis_info, FINISHED_PERSISTENT_GEN_TAG
