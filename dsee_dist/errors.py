"""User-facing errors: anything raised as a `DSEEError` is printed as one line and exits non-zero
(engine/process_exit.py: `reports_errors` on every command's `main`)."""


class DSEEError(Exception):
    """A problem the user can fix (bad config, missing file, bad target). The message says what and how."""

    exit_code = 2


class ConfigError(DSEEError):
    """The experiment config is invalid."""
