"""Child processes that end with their parent: the wrappers' fairseq-train, evaluation and averaging.

`run(cmd)` starts CMD in a process group of its own and, while it runs, turns SIGINT, SIGTERM and
SIGHUP sent to this process into a SIGTERM to that whole group (fairseq-train, its data-loader and
distributed workers), then waits for the group's leader to end. A second signal sends SIGKILL. Why
SIGTERM for Ctrl-C too: SIGINT would make every Python process of the group print a
KeyboardInterrupt traceback; SIGTERM ends them quietly, and neither lets fairseq save anything more.
Why a group of its own: the wrapper decides when the child stops and waits for it, instead of the
terminal signalling both at once and the wrapper exiting first (subprocess.run then SIGKILLs its child
only, whose own children live on). On Linux the child also gets SIGTERM if this process dies
without a chance to forward anything (SIGKILL): prctl(PR_SET_PDEATHSIG).

After a signal `run` raises `Stopped`; `exit_stopped` prints one line and ends this process by the
same signal (the convention a shell or a parent wrapper reads as "killed by SIGTERM": status 143,
or 130 for Ctrl-C), so nothing after it (a DONE marker) runs.
"""
import ctypes
import os
import signal
import subprocess
import sys
import threading

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


class Stopped(Exception):
    """The child was ended because this process received `signum`."""

    def __init__(self, signum, returncode):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.returncode = returncode


def _end_with_parent():
    # Runs in the child between fork and exec: SIGTERM when the parent thread dies.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def run(cmd, on_line=None, **popen_kwargs):
    """Run CMD to its end and return its exit status; with `on_line`, its stdout+stderr are read as
    text lines and each is passed to on_line. Raises Stopped if a forwarded signal arrived."""
    received = []
    proc = None

    def forward(signum, _frame):
        received.append(signum)
        if proc is not None:
            _signal_group(proc, signal.SIGKILL if len(received) > 1 else signal.SIGTERM)

    # Signal handlers can only be set from the main thread; elsewhere the caller's own handling applies.
    handle = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, forward) for s in FORWARDED} if handle else {}
    try:
        if on_line is not None:
            popen_kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        proc = subprocess.Popen(cmd, start_new_session=True,
                                preexec_fn=_end_with_parent if sys.platform.startswith("linux") else None,
                                **popen_kwargs)
        if received:  # a signal came while the child was being started
            _signal_group(proc, signal.SIGTERM)
        if on_line is not None:
            for line in proc.stdout:
                on_line(line)
        returncode = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        raise Stopped(received[0], returncode)
    return returncode


def _signal_group(proc, signum):
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:  # the group has ended already
        pass


def exit_stopped(stopped, message):
    """Print `message` (one line, stderr) and end this process by the signal that stopped the child."""
    print(message, file=sys.stderr, flush=True)
    signal.signal(stopped.signum, signal.SIG_DFL)
    os.kill(os.getpid(), stopped.signum)
    sys.exit(128 + stopped.signum)  # not reached where the signal's default action ends the process
