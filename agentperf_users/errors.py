"""The one exception type the command line turns into a one-line message.

Bad input (a malformed trajectory line, an unknown SLO key, a port in use) must reach the user as a
single line naming the file, line or field and what was expected, never as a traceback. Code raises
``AgentperfError`` with that line; ``cli.main`` prints it and exits non-zero.
"""


class AgentperfError(Exception):
    """A user-facing error whose message is already the one line to print."""

    exit_code = 2
