"""The data path: JSONL records, chat-template encoding with token weights, padded batches
and the layout one forward runs them in. May import: tabpo.common, tabpo.losses, tabpo.models.
"""
