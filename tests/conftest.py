"""Suite-wide set-up."""

import signal


def pytest_configure(config):
    # Several tests check what Ctrl-C does, in this process and in the scripts they start. A shell that starts the
    # suite in the background without job control (`cmd &` in a script) sets SIGINT to "ignore", which Python and
    # every child process would inherit, so Ctrl-C would reach no handler: give it Python's usual one back. The
    # children then start with SIGINT at its default, as they do from a terminal.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
