"""The process and its device, beneath everything else (it imports nothing of cityseg's but
its errors). One question per module:

- distributed.py: which processes share this run, and how do they agree? (torchrun, NCCL or
  gloo; one process is the same code path with world size 1)
- device.py: which device, at what precision, seeded and (optionally) deterministic?
- files.py: how is a file written whole or not at all? (`written_whole`)
- process.py: is a process of this host still there? (`pid_alive`)
"""
