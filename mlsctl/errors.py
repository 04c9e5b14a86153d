"""The one exception type for mistakes a user can fix.

A :class:`UserError` carries one sentence that names the file or key at fault and the fix. The
CLI prints it without a traceback and exits with ``exit_code`` (2 for usage errors, 1 for
failures of a well-formed request).
"""


class UserError(Exception):
    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message
