"""Model families both stacks support, safetensors and adapter formats, conversion, merging
and the tiny demo model. May import: tabpo.common."""
