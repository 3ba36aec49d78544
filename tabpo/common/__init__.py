"""The foundation: the errors the CLI turns into one line, and files written atomically.
May import: nothing of the project (the standard library only)."""
