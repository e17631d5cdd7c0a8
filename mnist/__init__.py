"""The CNN, the datasets and standalone training (`python mnist/nn.py`)."""
