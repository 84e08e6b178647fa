"""The one exception type the CLI turns into ``error: <message>`` and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a missing path, a bad number, an unsupported model.

    The message is one line that names the offending field or file.
    """
