"""The one exception type that reaches the user as a single line (exit code 2, no traceback)."""


class JpadaptError(Exception):
    """Bad input or configuration: the message names the place (file, line, key) and what is wrong.

    Library code raises it for problems the user can fix; the CLI prints `error: <message>` and exits 2.
    Anything else that escapes a stage is a bug and is reported with a pointer to the stage log.
    """
