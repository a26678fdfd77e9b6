"""User-facing errors: anything raised as a `DSEEError` is printed as one line and exits non-zero."""


class DSEEError(Exception):
    """A problem the user can fix (bad config, missing file, bad target). The message says what and how."""

    exit_code = 2


class ConfigError(DSEEError):
    """The experiment config is invalid."""


def reports_errors(command: str):
    """Decorator for a command's entry point: a `DSEEError` it raises becomes one line on stderr,
    `dsee-dist COMMAND: error: MESSAGE`, and the error's exit status."""
    import functools
    import sys

    def decorate(fn):
        @functools.wraps(fn)
        def entry(*args, **kwargs) -> int:
            try:
                return fn(*args, **kwargs)
            except DSEEError as exc:
                print(f"dsee-dist {command}: error: {exc}", file=sys.stderr)
                return exc.exit_code

        return entry

    return decorate
