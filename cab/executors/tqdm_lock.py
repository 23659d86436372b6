"""Preloaded by cab's forkserver (cab.executors.forkserver) and active only there: the children's tqdm write
lock is a thread lock instead of tqdm's default, a multiprocessing RLock.

tqdm builds that RLock (a POSIX semaphore registered with multiprocessing's resource tracker) the first time
any bar is made, and inductor makes one (disabled) while it waits for its compile jobs. A cell process ends
with os._exit or is killed, so the semaphore was never unregistered, and at the end of a `cab run` whose
cells compiled something (FlexAttention's check) the driver's resource tracker warned "There appear to be 1
leaked semaphore objects to clean up at shutdown". A forked child prints to its own files, so its bars need
no lock shared with other processes. Imported anywhere else, this module does nothing.
"""

from __future__ import annotations

import threading

from cab.executors.serverguard import in_forkserver

if in_forkserver():
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
