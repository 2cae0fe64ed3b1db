"""The timing stage: a SimPy engine with GPUs (streams), a flow-level network and costs."""
