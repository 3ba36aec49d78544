"""The training run: configuration, the Backend contract, the loop, checkpoints, reference
cache, schedule, metrics, parity, generation. May import: tabpo.common, tabpo.losses,
tabpo.data, tabpo.models.
"""
