"""The progress bar of long work: drawn on stderr only after its delay, silent when off, and lent
to sub-tasks without being closed by them."""

import time

from modelmap._progress import ProgressBar, progress_bar


def test_progress_bar_shows_only_after_its_delay_and_never_when_off():
    with ProgressBar("work", 3, delay=60.0) as quick:
        quick.advance()
    assert quick._bar is None  # done before the delay: never drawn
    with ProgressBar("work", 3, delay=0.01) as slow:
        time.sleep(0.3)
        assert slow._bar is not None
        with progress_bar(slow, "part", 2) as part:  # a sub-task ticks the caller's bar
            part.advance(2)
        assert slow.total == 5 and slow._done == 2 and slow._bar is not None
    assert slow._bar is None
    with progress_bar(False, "off", 3) as off:
        time.sleep(0.05)
        off.advance()
    assert off._bar is None
