class UserError(Exception):
    """Bad input from the user. `run.py` prints it as one line and exits with status 2, no traceback."""
