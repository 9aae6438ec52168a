"""A deterministic kill switch for the chaos test (tests/test_resume.py), imported by every Python process
whose PYTHONPATH starts with this folder. With SAPT_TEST_KILL_AT set to a glob, the process SIGKILLs its
whole process group (the pipeline) at the first rename into place of a file whose absolute path matches:
inside that file's atomic write, the temporary written, the final name not yet taken. Test-only: nothing
in the package knows of it."""

import fnmatch
import os
import signal

_PATTERN = os.environ.get("SAPT_TEST_KILL_AT")

if _PATTERN:
    _replace = os.replace

    def _replace_or_die(src, dst, *args, **kwargs):
        if fnmatch.fnmatch(os.path.abspath(dst), _PATTERN):
            os.killpg(os.getpgrp(), signal.SIGKILL)
        return _replace(src, dst, *args, **kwargs)

    os.replace = _replace_or_die
