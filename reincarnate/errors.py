"""The errors a user can fix, and :func:`_one_line` to quote an exception inside one.

Every error a user can cause is one of these, with a one-line message that names the problem and the fix: a
:class:`TeacherError` (or one of its kinds) for teachers, downloads, the Hub and the run folder, a
:class:`ConfigError` for a flag value that cannot work.
"""

from __future__ import annotations


class TeacherError(RuntimeError):
    """A problem with a teacher the user can fix; the message is one line."""


class CheckpointError(TeacherError):
    """A checkpoint is missing, corrupt, unsafe or does not fit the network."""


class DownloadError(TeacherError):
    """The bucket (or mirror) could not deliver a verified file."""


class EnvIdError(TeacherError, ValueError):
    """An env id envpool does not know."""


class HubError(TeacherError):
    """The Hub could not be reached, or refused a login check or an upload; the message is one line."""


class RunError(TeacherError):
    """A problem with the run folder, a checkpoint or the machine that the user can fix; one line."""


class ConfigError(ValueError):
    """A flag value that cannot work; the message is one line."""


def _one_line(e: BaseException | str) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."
