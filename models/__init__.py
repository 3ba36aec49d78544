"""Model families both stacks support, adapter formats and the tiny demo model."""
