"""A frame function that kills its process for real (a segmentation fault), as a native decoder
does on some corrupt compressed chunks; imported by the crash tests and their child processes."""

from __future__ import annotations

import ctypes

from sfxflow.pipeline.frame import process_frame

CRASH_FILE = "run_0000.cxi"
CRASH_FRAME = 2


def crash_on_one_frame(frame, config):
    if frame.index == CRASH_FRAME and frame.source_url.endswith(CRASH_FILE):
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    return process_frame(frame, config)
