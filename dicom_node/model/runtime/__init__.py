"""Inference runtimes of the M2FP network, and the choice of one by measurement.

``names`` (torch-free: what the configuration and the CLI offer), ``base`` (what every runtime
gives the engine), ``eager`` / ``openvino`` / ``int8`` (the runtimes), ``registry`` (name ->
factory), ``agreement`` (the check a candidate must pass against eager fp32), ``choice`` (which
runtime to use, ``auto`` by measurement), ``check`` (the checks in a process of their own) and
``cache`` (exported graphs and check results beside the model).

This package's face imports nothing, so that importing the names never loads torch.
"""
