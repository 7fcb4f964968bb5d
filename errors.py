"""One exception type for problems the *user* can fix (bad flag, missing file, wrong checkpoint).

Entry scripts catch it at the top (`cli.run_main`) and print its message as one line, without a
traceback, then exit with status 2. Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, explained in one sentence."""
