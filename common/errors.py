class UserError(Exception):
    """Bad input from the user. `run.py` prints it as one line and exits with status 2, no traceback."""
    exit_status = 2


class Interrupted(UserError):
    """A run stopped by a signal: one line, and the shell's status for that signal (128 + its number)."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_status = 128 + signal_number
