"""The bottom of the stack: errors for users and file helpers that every package below run.py shares."""
