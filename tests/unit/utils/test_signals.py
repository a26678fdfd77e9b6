import os
import signal

from dsee_dist.utils.signals import install_handlers, restore_handlers


def test_installed_handler_receives_the_signal_and_restore_puts_back_the_previous_one():
    received = []
    before = signal.getsignal(signal.SIGUSR2)
    previous = install_handlers([signal.SIGUSR2], lambda signum, frame: received.append(signum))
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert received == [signal.SIGUSR2]
        assert previous == {signal.SIGUSR2: before}
    finally:
        restore_handlers(previous)
    assert signal.getsignal(signal.SIGUSR2) is before
