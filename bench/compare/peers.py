#!/usr/bin/env python3
"""Benchmark three Python remote-execution libraries side by side.

The peers are chopsticks 1.0 (Python), mitogen and execnet. The numbers are
meant to be set next to those of the Rust chopsticks library.

Usage:

    peers.py LIBRARY TRANSPORT [--ssh-config PATH --ssh-host ALIAS ...]
             [--ssh-user U --ssh-port P --ssh-key K] [--quick]

LIBRARY is one of chopsticks, mitogen, execnet. TRANSPORT is ``local`` (a
local subprocess running this interpreter) or ``ssh`` (hosts are aliases in
an OpenSSH client config file, passed to ssh with ``-F``).

Exactly one JSON object is printed on stdout at the end. Progress and errors
go to stderr. Exit status: 0 on success, 2 on usage errors, 1 when a library
or workload fails (unless --keep-going was given, in which case the failed
workload's fields are null and the error is listed in ``notes``).

Workloads (identical for every library, all timed with time.perf_counter):

  trivial_us_median / trivial_us_p99
      one connection, 200 warm-up calls, then 2000 sequential calls of the
      module-level no-op function ``noop``; per-call latency in microseconds.
  calls_per_s / calls_mode
      highest trivial-call rate on ONE connection: 64 calls in flight where
      the library allows it ("pipelined-64"), otherwise "serial"; at least 1 s
      of work.
  arg64_mb_s
      one call whose argument is 64 MiB of random bytes and which returns its
      length; median of 3 runs, MB = 1e6 bytes.
  put_mb_s / fetch_mb_s / transfer_method
      a 256 MiB random file copied to the remote and back using the library's
      own file transfer (or 1 MiB chunks over a channel, see transfer_method);
      median of 2 runs each; the size of every copy is verified.
  fanout20_s
      20 connections opened concurrently, one trivial call on each; wall time
      from the first connect to the last result.
  connect_first_call_ms
      median over 5 rounds of (connect + one trivial call); close not timed.

--quick shrinks sizes and iteration counts (20 warm-up + 200 calls, 16 MiB
argument, 16 MiB file, 3 connect rounds) for smoke tests; the rate window stays
1 s. The sizes actually used are reported in the ``params`` field.

NOTE for maintainers: mitogen children import this very file as their
__main__ module (mitogen serves the parent's __main__ source, cut at the
``__name__`` guard), and chopsticks ships the source of the module-level
functions it calls. Therefore the module top level must import only the
standard library; the peer libraries are imported lazily inside functions.
"""

from __future__ import print_function

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback

MiB = 1 << 20
LIBRARIES = ('chopsticks', 'mitogen', 'execnet')
TRANSPORTS = ('local', 'ssh')
PIPELINE_DEPTH = 64
FANOUT = 20
CHUNK = MiB  # chunk size for channel-streamed file transfers


# ---------------------------------------------------------------------------
# Functions executed remotely. Keep them module level and stdlib-only.
# ---------------------------------------------------------------------------

def noop():
    return None


def arglen(data):
    return len(data)


def remote_mkdtemp():
    import tempfile
    return tempfile.mkdtemp(prefix='peers-bench-remote-')


def remote_size(path):
    import os
    return os.path.getsize(path)


def remote_rmtree(path):
    import shutil
    shutil.rmtree(path, ignore_errors=True)
    return True


def mitogen_put_remote(master, src, dst):
    """Runs in a mitogen child: pull `src` from the master's FileService."""
    import os
    import mitogen.core
    import mitogen.service
    fp = open(dst, 'wb', mitogen.core.CHUNK_SIZE)
    try:
        ok, _meta = mitogen.service.FileService.get(
            context=master, path=src, out_fp=fp)
    finally:
        fp.close()
    if not ok:
        raise IOError('mitogen FileService transfer of %r was interrupted'
                      % (src,))
    return os.path.getsize(dst)


# execnet executes source text remotely; these are the remote halves.
EXECNET_NOOP_SRC = '''
def noop():
    return None
channel.send(noop())
'''

EXECNET_LOOP_SRC = '''
def noop():
    return None
while True:
    request = channel.receive()
    if request is None:
        break
    channel.send(noop())
'''

EXECNET_ARGLEN_SRC = '''
def arglen(data):
    return len(data)
channel.send(arglen(channel.receive()))
'''

EXECNET_PUT_SRC = '''
import os
path = channel.receive()
f = open(path, 'wb')
try:
    while True:
        chunk = channel.receive()
        if chunk is None:
            break
        f.write(chunk)
finally:
    f.close()
channel.send(os.path.getsize(path))
'''

EXECNET_FETCH_SRC = '''
path, chunk_size = channel.receive()
f = open(path, 'rb')
try:
    while True:
        chunk = f.read(chunk_size)
        if not chunk:
            break
        channel.send(chunk)
finally:
    f.close()
channel.send(None)
'''

EXECNET_MKDTEMP_SRC = '''
import tempfile
channel.send(tempfile.mkdtemp(prefix='peers-bench-remote-'))
'''

EXECNET_SIZE_SRC = '''
import os
channel.send(os.path.getsize(channel.receive()))
'''

EXECNET_RMTREE_SRC = '''
import shutil
shutil.rmtree(channel.receive(), ignore_errors=True)
channel.send(True)
'''


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

class BenchError(Exception):
    """A failure that ends the benchmark with a message on stderr."""


class WorkloadTimeout(BaseException):
    """Raised by the SIGALRM watchdog. BaseException so that library code
    with broad ``except Exception`` handlers does not swallow it."""


_T0 = time.perf_counter()


def log(msg):
    sys.stderr.write('[peers %7.2fs] %s\n' % (time.perf_counter() - _T0, msg))
    sys.stderr.flush()


def median(values):
    return statistics.median(values)


def p99(values):
    """Nearest-rank 99th percentile."""
    s = sorted(values)
    return s[max(0, int(math.ceil(0.99 * len(s))) - 1)]


def mb_s(nbytes, seconds):
    return nbytes / 1e6 / seconds


def rnd(x, digits=3):
    return None if x is None else round(x, digits)


class Watchdog(object):
    """SIGALRM-based time limit for one workload (main thread only)."""

    def __init__(self, seconds, what):
        self.seconds = seconds
        self.what = what

    def _fire(self, signum, frame):
        raise WorkloadTimeout('%s exceeded the %ds time limit'
                              % (self.what, self.seconds))

    def __enter__(self):
        if self.seconds:
            self._old = signal.signal(signal.SIGALRM, self._fire)
            signal.alarm(int(self.seconds))
        return self

    def __exit__(self, *exc):
        if self.seconds:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, self._old)
        return False


def write_random_file(path, nbytes):
    with open(path, 'wb') as f:
        left = nbytes
        while left:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n


def run_threads(fn, items):
    """Run fn(item) for every item, each in its own thread; return results
    in order, re-raising the first exception after all threads finished."""
    results = [None] * len(items)
    errors = [None] * len(items)

    def work(i, item):
        try:
            results[i] = fn(item)
        except BaseException as e:  # noqa: B902 - reported below
            errors[i] = e

    threads = [threading.Thread(target=work, args=(i, item), daemon=True)
               for i, item in enumerate(items)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e in errors:
        if e is not None:
            raise e
    return results


# ---------------------------------------------------------------------------
# Library adapters
# ---------------------------------------------------------------------------

class Peer(object):
    """Common interface. `conn` objects are adapter specific."""

    name = None
    calls_mode = 'serial'
    transfer_method = None

    def __init__(self, opts):
        self.opts = opts
        self.shim = []
        self.notes = []
        if opts.transport == 'ssh':
            if opts.ssh_compression == 'no':
                self.notes.append(
                    'ssh: compression forced off (-o Compression=no on the '
                    'ssh command line, which overrides the config file).')
            else:
                self.notes.append(
                    'ssh: compression left at the library default.')

    # -- ssh plumbing shared by all adapters --------------------------------
    def alias(self, idx):
        hosts = self.opts.ssh_host
        return hosts[idx % len(hosts)]

    def ssh_options(self):
        """ssh client options common to every library (before the host)."""
        o = self.opts
        args = []
        if o.ssh_config:
            args += ['-F', o.ssh_config]
        args += ['-o', 'BatchMode=yes']
        if o.ssh_compression == 'no':
            args += ['-o', 'Compression=no']
        if o.ssh_user:
            args += ['-l', o.ssh_user]
        if o.ssh_port:
            args += ['-p', str(o.ssh_port)]
        if o.ssh_key:
            args += ['-i', o.ssh_key]
        return args

    # -- to be implemented ---------------------------------------------------
    def version(self):
        raise NotImplementedError

    def connect(self, idx=0):
        raise NotImplementedError

    def close(self, conn):
        raise NotImplementedError

    def invoke(self, conn, fn, *args):
        """Call the module-level function fn(*args) on the remote side."""
        return conn.call(fn, *args)

    def call_noop(self, conn):
        return self.invoke(conn, noop)

    def rate(self, conn, min_seconds):
        """Return (ncalls, elapsed) for trivial calls, at least min_seconds."""
        n = 0
        call = self.call_noop
        t0 = time.perf_counter()
        while True:
            call(conn)
            n += 1
            if n % 16 == 0:
                elapsed = time.perf_counter() - t0
                if elapsed >= min_seconds:
                    return n, elapsed

    def call_arglen(self, conn, data):
        return self.invoke(conn, arglen, data)

    def remote_mkdtemp(self, conn):
        return self.invoke(conn, remote_mkdtemp)

    def remote_size(self, conn, path):
        return self.invoke(conn, remote_size, path)

    def remote_rmtree(self, conn, path):
        return self.invoke(conn, remote_rmtree, path)

    def put(self, conn, local_path, remote_path):
        raise NotImplementedError

    def fetch(self, conn, remote_path, local_path):
        raise NotImplementedError

    def fanout(self, n):
        """Open n connections concurrently, one trivial call on each.
        Return (seconds, conns); the caller closes conns."""
        def one(i):
            c = self.connect(i)
            self.call_noop(c)
            return c
        t0 = time.perf_counter()
        conns = run_threads(one, list(range(n)))
        return time.perf_counter() - t0, conns

    def close_many(self, conns):
        run_threads(self.close, [c for c in conns if c is not None])

    def shutdown(self):
        pass


# -- chopsticks 1.0 ----------------------------------------------------------

def apply_chopsticks_shim():
    """chopsticks 1.0's serialise_main.trace_globals() decodes bytecode by
    hand and indexes co_names with the raw LOAD_GLOBAL oparg. Since Python
    3.11 that oparg is (namei << 1) | push_null, so every call of a function
    defined in __main__ fails with IndexError (or picks wrong names). Replace
    it with an equivalent that uses dis.get_instructions() and argval."""
    import dis
    import types
    import chopsticks.serialise_main as sm

    if sys.version_info < (3, 11):
        return []

    def trace_globals(code):
        """Find the global names loaded within the given code object."""
        loads = set()
        for ins in dis.get_instructions(code):
            if ins.opname in ('LOAD_GLOBAL', 'LOAD_NAME'):
                loads.add(ins.argval)
        for c in code.co_consts:
            if isinstance(c, types.CodeType):
                loads.update(trace_globals(c))
        return loads

    sm.trace_globals = trace_globals
    return [
        'chopsticks.serialise_main.trace_globals replaced at runtime (venv '
        'files untouched): the original indexes code.co_names with the raw '
        'LOAD_GLOBAL oparg, which on Python >= 3.11 is (namei << 1) | '
        'push_null, so calling any function defined in __main__ raised '
        'IndexError; the replacement collects ins.argval of LOAD_GLOBAL/'
        'LOAD_NAME instructions from dis.get_instructions(), recursing into '
        'nested code objects exactly like the original.'
    ]


class ChopsticksPeer(Peer):
    name = 'chopsticks'
    calls_mode = 'serial'
    transfer_method = ('chopsticks built-in Tunnel.put() / Tunnel.fetch() '
                       '(streamed in 10 KiB messages, sha1-checked)')

    def __init__(self, opts):
        super(ChopsticksPeer, self).__init__(opts)
        import chopsticks
        import chopsticks.tunnel as ct
        import chopsticks.group as cg
        self.chopsticks = chopsticks
        self.ct = ct
        self.cg = cg
        self.shim = apply_chopsticks_shim()
        self.notes.append(
            'chopsticks: Tunnel.call() blocks until the result arrives and the '
            'tunnel stops reading after each result, so there is no way to '
            'have several calls in flight on one tunnel; calls_per_s is serial.')
        self.notes.append(
            'chopsticks: functions defined in __main__ are shipped as source '
            'with every call (chopsticks\' normal mechanism for __main__).')
        self.notes.append(
            'chopsticks: fanout20 uses chopsticks.group.Group.call(), which '
            'connects and calls all tunnels in parallel on one I/O loop.')
        self._counter = 0
        peer = self

        if opts.transport == 'local':
            class BenchLocal(ct.Local):
                # chopsticks runs /usr/bin/python3 by default; use this
                # interpreter like mitogen.local and execnet popen do.
                python3 = sys.executable
            self._local_cls = BenchLocal
            self.notes.append(
                'chopsticks: Local tunnels run %s (the default would be '
                '/usr/bin/python3) so all libraries use the same interpreter.'
                % sys.executable)
        else:
            class BenchSSH(ct.SSHTunnel):
                """SSHTunnel whose ssh command honours the benchmark's ssh
                options (-F config etc.). `host` is a unique display name
                so that a Group may hold several tunnels to one alias."""
                python3 = opts.remote_python

                def __init__(self, alias, name):
                    ct.SSHTunnel.__init__(self, name)
                    self.alias = alias

                def cmd_args(self):
                    args = ['ssh', '-o', 'PasswordAuthentication=no']
                    args += peer.ssh_options()
                    args.append(self.alias)
                    remote = ct.SubprocessTunnel.cmd_args(self)
                    return args + [shlex.quote(w) for w in remote]
            self._ssh_cls = BenchSSH

    def version(self):
        return self.chopsticks.__version__

    def _make(self, idx):
        self._counter += 1
        if self.opts.transport == 'local':
            return self._local_cls('local-%d' % self._counter)
        alias = self.alias(idx)
        return self._ssh_cls(alias, '%s#%d' % (alias, self._counter))

    def connect(self, idx=0):
        t = self._make(idx)
        try:
            t.connect()
        except BaseException:
            self.close(t)
            raise
        return t

    def close(self, conn):
        try:
            conn.close()
        except Exception as e:  # never mask the original problem
            log('chopsticks: close failed: %r' % (e,))

    def put(self, conn, local_path, remote_path):
        conn.put(local_path, remote_path)

    def fetch(self, conn, remote_path, local_path):
        conn.fetch(remote_path, local_path)

    def fanout(self, n):
        # chopsticks' own concurrency: a Group connects and calls all
        # tunnels in parallel on its single I/O loop.
        t0 = time.perf_counter()
        tunnels = [self._make(i) for i in range(n)]
        group = self.cg.Group(tunnels)
        try:
            res = group.call(noop)
            elapsed = time.perf_counter() - t0
            res.raise_failures()
            if len(res) != n:
                raise BenchError('chopsticks Group.call returned %d results, '
                                 'expected %d' % (len(res), n))
        except BaseException:
            group.close()
            raise
        return elapsed, [group]


# -- mitogen -----------------------------------------------------------------

class MitogenPeer(Peer):
    name = 'mitogen'
    calls_mode = 'pipelined-%d' % PIPELINE_DEPTH
    transfer_method = (
        'mitogen.service.FileService (built-in streaming service, 128 KiB '
        'chunks, 1 MiB ack window). put: the master registers the file with '
        'its FileService and the child pulls it with FileService.get(), as '
        'ansible_mitogen put_file does; fetch: the master pulls from the '
        'child\'s auto-activated FileService with FileService.get(), as '
        'ansible_mitogen fetch_file does.')

    def __init__(self, opts):
        super(MitogenPeer, self).__init__(opts)
        import mitogen
        import mitogen.core
        import mitogen.master
        import mitogen.service
        self.mitogen = mitogen
        self.broker = mitogen.master.Broker()
        self.router = mitogen.master.Router(self.broker)
        self._pool = None
        self._registered = set()
        self.notes.append(
            'mitogen: fanout20 connects from 20 threads (router.local()/'
            'router.ssh() are blocking), one context.call() each.')
        if opts.transport == 'ssh' and opts.ssh_compression == 'no':
            self.notes.append(
                'mitogen: router.ssh(compression=False); mitogen\'s default '
                'would add -o "Compression yes".')
        self.notes.append(
            'mitogen: one Broker/Router per process is created before any '
            'workload and is not part of connect timings.')
        if opts.transport == 'ssh':
            self.notes.append(
                'mitogen: router.ssh(check_host_keys="ignore") is used so '
                'mitogen does not force StrictHostKeyChecking=yes over the '
                'config file; mitogen also adds -o LogLevel=ERROR, '
                'ServerAlive* and BatchMode=yes.')

    def version(self):
        return '.'.join(str(x) for x in self.mitogen.__version__)

    def connect(self, idx=0):
        o = self.opts
        if o.transport == 'local':
            return self.router.local()
        ssh_args = []
        if o.ssh_config:
            ssh_args += ['-F', o.ssh_config]
        if o.ssh_compression == 'no':
            ssh_args += ['-o', 'Compression=no']
        kwargs = dict(
            hostname=self.alias(idx),
            python_path=o.remote_python,
            ssh_args=ssh_args,
            check_host_keys='ignore',
            compression=(o.ssh_compression != 'no'),
        )
        if o.ssh_user:
            kwargs['username'] = o.ssh_user
        if o.ssh_port:
            kwargs['port'] = int(o.ssh_port)
        if o.ssh_key:
            kwargs['identity_file'] = o.ssh_key
        return self.router.ssh(**kwargs)

    def close(self, conn):
        try:
            conn.shutdown(wait=False).get(timeout=30)
        except Exception as e:
            log('mitogen: shutdown of %r failed: %r' % (conn, e))

    def rate(self, conn, min_seconds):
        from collections import deque
        inflight = deque()
        n = 0
        t0 = time.perf_counter()
        for _ in range(PIPELINE_DEPTH):
            inflight.append(conn.call_async(noop))
        while inflight:
            inflight.popleft().get().unpickle()
            n += 1
            if time.perf_counter() - t0 < min_seconds:
                inflight.append(conn.call_async(noop))
        return n, time.perf_counter() - t0

    def put(self, conn, local_path, remote_path):
        import mitogen.service
        if self._pool is None:
            self._pool = mitogen.service.get_or_create_pool(router=self.router)
        if local_path not in self._registered:
            self._pool.get_service('mitogen.service.FileService').register(
                path=local_path)
            self._registered.add(local_path)
        conn.call(mitogen_put_remote, self.router.myself(),
                  local_path, remote_path)

    def fetch(self, conn, remote_path, local_path):
        import mitogen.core
        import mitogen.service
        fp = open(local_path, 'wb', mitogen.core.CHUNK_SIZE)
        try:
            ok, _meta = mitogen.service.FileService.get(
                context=conn, path=remote_path, out_fp=fp)
        finally:
            fp.close()
        if not ok:
            raise BenchError('mitogen FileService fetch of %r was interrupted'
                             % (remote_path,))

    def shutdown(self):
        try:
            self.broker.shutdown()
            self.broker.join()
        except Exception as e:
            log('mitogen: broker shutdown failed: %r' % (e,))


# -- execnet -----------------------------------------------------------------

class ExecnetConn(object):
    def __init__(self, group, gw):
        self.group = group
        self.gw = gw
        self.loop = None  # persistent request/response channel, lazily


class ExecnetPeer(Peer):
    name = 'execnet'
    calls_mode = 'pipelined-%d' % PIPELINE_DEPTH
    transfer_method = (
        'execnet channel streaming (execnet has no built-in single-file '
        'put/fetch; RSync only syncs directory trees): put sends 1 MiB chunks '
        'over one channel to remote_exec\'d code that writes them; fetch has '
        'remote code read 1 MiB chunks and send them over the channel.')

    def __init__(self, opts):
        super(ExecnetPeer, self).__init__(opts)
        import execnet
        import execnet.gateway_io as gio
        self.execnet = execnet
        self.notes.append(
            'execnet: a trivial call is gw.remote_exec(source defining and '
            'calling noop) + channel.receive() + channel.waitclose(); '
            'trivial_channel_us_* time the same no-op over one persistent '
            'channel (send request, remote loop calls noop, receive reply), '
            'the mechanism used for calls_per_s with 64 requests in flight.')
        self.notes.append(
            'execnet: fanout20 opens the 20 gateways from 20 threads (one '
            'execnet.Group per gateway), one remote_exec no-op call each.')
        if opts.transport == 'ssh' and opts.ssh_compression == 'no':
            orig = gio.ssh_args

            def ssh_args_without_C(spec, _orig=orig):
                return [a for a in _orig(spec) if a != '-C']
            gio.ssh_args = ssh_args_without_C
            self.shim.append(
                'execnet.gateway_io.ssh_args wrapped to drop the hard-coded '
                '"-C" (ssh compression), because ssh -C cannot be undone by a '
                'later -o Compression=no; see ssh_compression.')

    def version(self):
        return self.execnet.__version__

    def spec(self, idx):
        o = self.opts
        if o.transport == 'local':
            return 'popen'
        words = self.ssh_options()
        if o.ssh_config:
            # passed by execnet itself through its ssh_config spec key
            i = words.index('-F')
            del words[i:i + 2]
        words.append(self.alias(idx))
        for w in words:
            if not w or any(c.isspace() for c in w) or '//' in w:
                raise BenchError('execnet cannot pass ssh argument %r in a '
                                 'gateway spec' % (w,))
        spec = 'ssh=%s//python=%s' % (' '.join(words), o.remote_python)
        if o.ssh_config:
            if '//' in o.ssh_config:
                raise BenchError('execnet spec cannot hold %r' % o.ssh_config)
            spec += '//ssh_config=%s' % o.ssh_config
        return spec

    def connect(self, idx=0):
        group = self.execnet.Group()
        try:
            gw = group.makegateway(self.spec(idx))
        except BaseException:
            group.terminate(timeout=5)
            raise
        return ExecnetConn(group, gw)

    def close(self, conn):
        try:
            if conn.loop is not None:
                try:
                    conn.loop.send(None)
                    conn.loop.waitclose(10)
                except Exception:
                    pass
            conn.group.terminate(timeout=10)
        except Exception as e:
            log('execnet: close failed: %r' % (e,))

    def _exec(self, conn, src, *send):
        ch = conn.gw.remote_exec(src)
        for item in send:
            ch.send(item)
        res = ch.receive()
        ch.waitclose()
        return res

    def call_noop(self, conn):
        return self._exec(conn, EXECNET_NOOP_SRC)

    def loop_channel(self, conn):
        if conn.loop is None:
            conn.loop = conn.gw.remote_exec(EXECNET_LOOP_SRC)
        return conn.loop

    def channel_call_noop(self, conn):
        ch = conn.loop
        ch.send(1)
        return ch.receive()

    def rate(self, conn, min_seconds):
        ch = self.loop_channel(conn)
        # warm the channel up
        for _ in range(PIPELINE_DEPTH):
            ch.send(1)
            ch.receive()
        n = 0
        outstanding = 0
        t0 = time.perf_counter()
        for _ in range(PIPELINE_DEPTH):
            ch.send(1)
            outstanding += 1
        while outstanding:
            ch.receive()
            outstanding -= 1
            n += 1
            if time.perf_counter() - t0 < min_seconds:
                ch.send(1)
                outstanding += 1
        return n, time.perf_counter() - t0

    def call_arglen(self, conn, data):
        return self._exec(conn, EXECNET_ARGLEN_SRC, data)

    def remote_mkdtemp(self, conn):
        return self._exec(conn, EXECNET_MKDTEMP_SRC)

    def remote_size(self, conn, path):
        return self._exec(conn, EXECNET_SIZE_SRC, path)

    def remote_rmtree(self, conn, path):
        return self._exec(conn, EXECNET_RMTREE_SRC, path)

    def put(self, conn, local_path, remote_path):
        ch = conn.gw.remote_exec(EXECNET_PUT_SRC)
        ch.send(remote_path)
        with open(local_path, 'rb') as f:
            while True:
                chunk = f.read(CHUNK)
                if not chunk:
                    break
                ch.send(chunk)
        ch.send(None)
        ch.receive()  # remote size, checked separately by the caller
        ch.waitclose()

    def fetch(self, conn, remote_path, local_path):
        ch = conn.gw.remote_exec(EXECNET_FETCH_SRC)
        ch.send((remote_path, CHUNK))
        with open(local_path, 'wb') as f:
            while True:
                chunk = ch.receive()
                if chunk is None:
                    break
                f.write(chunk)
        ch.waitclose()


PEERS = {
    'chopsticks': ChopsticksPeer,
    'mitogen': MitogenPeer,
    'execnet': ExecnetPeer,
}


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------

class Params(object):
    def __init__(self, quick):
        self.quick = quick
        if quick:
            self.warmup = 20
            self.trivial_calls = 200
            self.rate_seconds = 1.0
            self.arg_bytes = 16 * MiB
            self.arg_runs = 3
            self.file_bytes = 16 * MiB
            self.file_runs = 2
            self.connect_rounds = 3
        else:
            self.warmup = 200
            self.trivial_calls = 2000
            self.rate_seconds = 1.0
            self.arg_bytes = 64 * MiB
            self.arg_runs = 3
            self.file_bytes = 256 * MiB
            self.file_runs = 2
            self.connect_rounds = 5
        self.fanout = FANOUT

    def as_dict(self):
        return dict(
            quick=self.quick,
            warmup_calls=self.warmup,
            trivial_calls=self.trivial_calls,
            rate_min_seconds=self.rate_seconds,
            pipeline_depth=PIPELINE_DEPTH,
            arg_bytes=self.arg_bytes,
            arg_runs=self.arg_runs,
            file_bytes=self.file_bytes,
            file_runs=self.file_runs,
            fanout_connections=self.fanout,
            connect_rounds=self.connect_rounds,
        )


class Bench(object):
    def __init__(self, opts):
        self.opts = opts
        self.p = Params(opts.quick)
        self.peer = None
        self.conn = None
        self.open_conns = []
        self.cleanups = []
        self.notes = []
        self.r = {
            'library': opts.library,
            'version': None,
            'transport': opts.transport,
            'python': '%s %s' % (platform.python_implementation(),
                                 platform.python_version()),
            'python_executable': sys.executable,
            'remote_python': (sys.executable if opts.transport == 'local'
                              else opts.remote_python),
            'hosts': (None if opts.transport == 'local'
                      else list(opts.ssh_host)),
            'ssh_compression': (None if opts.transport == 'local'
                                else opts.ssh_compression),
            'params': self.p.as_dict(),
            'trivial_us_median': None,
            'trivial_us_p99': None,
            'calls_per_s': None,
            'calls_mode': None,
            'arg64_mb_s': None,
            'put_mb_s': None,
            'fetch_mb_s': None,
            'transfer_method': None,
            'fanout20_s': None,
            'connect_first_call_ms': None,
            'shim': None,
            'notes': self.notes,
        }

    # -- workload runner -----------------------------------------------------
    def workload(self, name, fields, fn):
        log('%s/%s: %s ...' % (self.opts.library, self.opts.transport, name))
        t0 = time.perf_counter()
        try:
            with Watchdog(self.opts.timeout, name):
                fn()
        except (Exception, WorkloadTimeout) as e:
            msg = '%s failed: %s: %s' % (name, type(e).__name__, e)
            if not self.opts.keep_going:
                raise BenchError(msg)
            traceback.print_exc(file=sys.stderr)
            log('%s (continuing, --keep-going)' % msg)
            for f in fields:
                self.r[f] = None
            self.notes.append(msg)
        else:
            log('%s: done in %.2fs: %s' % (
                name, time.perf_counter() - t0,
                ', '.join('%s=%s' % (f, self.r.get(f)) for f in fields)))

    def ensure_conn(self):
        if self.conn is None:
            self.conn = self.peer.connect(0)
            self.open_conns.append(self.conn)
        return self.conn

    # -- workloads -------------------------------------------------------------
    def w_trivial(self):
        peer, p = self.peer, self.p
        conn = self.ensure_conn()
        for _ in range(p.warmup):
            peer.call_noop(conn)
        lat = self._time_calls(peer.call_noop, conn, p.trivial_calls)
        self.r['trivial_us_median'] = rnd(median(lat), 1)
        self.r['trivial_us_p99'] = rnd(p99(lat), 1)
        if isinstance(peer, ExecnetPeer):
            peer.loop_channel(conn)
            for _ in range(p.warmup):
                peer.channel_call_noop(conn)
            lat = self._time_calls(peer.channel_call_noop, conn,
                                   p.trivial_calls)
            self.r['trivial_channel_us_median'] = rnd(median(lat), 1)
            self.r['trivial_channel_us_p99'] = rnd(p99(lat), 1)

    @staticmethod
    def _time_calls(call, conn, n):
        pc = time.perf_counter
        lat = []
        for _ in range(n):
            t0 = pc()
            res = call(conn)
            t1 = pc()
            if res is not None:
                raise BenchError('noop returned %r' % (res,))
            lat.append((t1 - t0) * 1e6)
        return lat

    def w_rate(self):
        conn = self.ensure_conn()
        n, elapsed = self.peer.rate(conn, self.p.rate_seconds)
        self.r['calls_per_s'] = rnd(n / elapsed, 1)
        self.r['calls_mode'] = self.peer.calls_mode
        self.r['calls_total'] = n
        self.r['calls_elapsed_s'] = rnd(elapsed, 4)

    def w_arg(self):
        conn = self.ensure_conn()
        p = self.p
        data = os.urandom(p.arg_bytes)
        speeds = []
        for i in range(p.arg_runs):
            t0 = time.perf_counter()
            n = self.peer.call_arglen(conn, data)
            dt = time.perf_counter() - t0
            if n != len(data):
                raise BenchError('remote len() returned %r, expected %d'
                                 % (n, len(data)))
            speeds.append(mb_s(len(data), dt))
            log('  arg run %d: %.3fs %.1f MB/s' % (i + 1, dt, speeds[-1]))
        self.r['arg64_mb_s'] = rnd(median(speeds), 2)

    def w_transfer(self):
        conn = self.ensure_conn()
        peer, p = self.peer, self.p
        self.r['transfer_method'] = peer.transfer_method
        local_dir = tempfile.mkdtemp(prefix='peers-bench-')
        self.cleanups.append(lambda: shutil.rmtree(local_dir, True))
        src = os.path.join(local_dir, 'src.bin')
        write_random_file(src, p.file_bytes)
        remote_dir = peer.remote_mkdtemp(conn)
        self.cleanups.insert(
            0, lambda: peer.remote_rmtree(conn, remote_dir))
        rpath = remote_dir.rstrip('/') + '/put.bin'

        put_speeds = []
        for i in range(p.file_runs):
            t0 = time.perf_counter()
            peer.put(conn, src, rpath)
            dt = time.perf_counter() - t0
            size = peer.remote_size(conn, rpath)
            if size != p.file_bytes:
                raise BenchError('put: remote copy has %r bytes, expected %d'
                                 % (size, p.file_bytes))
            put_speeds.append(mb_s(p.file_bytes, dt))
            log('  put run %d: %.3fs %.1f MB/s' % (i + 1, dt, put_speeds[-1]))
        self.r['put_mb_s'] = rnd(median(put_speeds), 2)

        fetch_speeds = []
        lpath = os.path.join(local_dir, 'fetch.bin')
        for i in range(p.file_runs):
            if os.path.exists(lpath):
                os.unlink(lpath)
            t0 = time.perf_counter()
            peer.fetch(conn, rpath, lpath)
            dt = time.perf_counter() - t0
            size = os.path.getsize(lpath)
            if size != p.file_bytes:
                raise BenchError('fetch: local copy has %d bytes, expected %d'
                                 % (size, p.file_bytes))
            fetch_speeds.append(mb_s(p.file_bytes, dt))
            log('  fetch run %d: %.3fs %.1f MB/s'
                % (i + 1, dt, fetch_speeds[-1]))
        self.r['fetch_mb_s'] = rnd(median(fetch_speeds), 2)

    def w_fanout(self):
        n = self.p.fanout
        conns = []
        try:
            elapsed, conns = self.peer.fanout(n)
        finally:
            if conns:
                self.peer.close_many(conns)
        self.r['fanout20_s'] = rnd(elapsed, 4)
        if self.opts.transport == 'ssh':
            distinct = len(set(self.opts.ssh_host[:n]))
            self.r['fanout_distinct_hosts'] = distinct
            if distinct < n:
                self.notes.append(
                    'fanout20_s: only %d ssh aliases given; the 20 '
                    'connections cycle over them.' % distinct)

    def w_connect(self):
        times = []
        for i in range(self.p.connect_rounds):
            t0 = time.perf_counter()
            conn = self.peer.connect(0)
            try:
                self.peer.call_noop(conn)
                times.append((time.perf_counter() - t0) * 1e3)
            finally:
                self.peer.close(conn)
        self.r['connect_first_call_ms'] = rnd(median(times), 2)

    # -- orchestration ---------------------------------------------------------
    def run(self):
        o = self.opts
        log('%s/%s: starting (%s mode)' % (
            o.library, o.transport, 'quick' if o.quick else 'full'))
        try:
            self.peer = PEERS[o.library](o)
        except ImportError as e:
            raise BenchError('cannot import %s: %s' % (o.library, e))
        self.r['version'] = self.peer.version()
        self.r['calls_mode'] = self.peer.calls_mode
        try:
            with Watchdog(o.timeout, 'connect'):
                self.ensure_conn()
                self.peer.call_noop(self.conn)
        except (Exception, WorkloadTimeout) as e:
            raise BenchError('could not connect or make a first call: %s: %s'
                             % (type(e).__name__, e))
        self.workload('trivial', ['trivial_us_median', 'trivial_us_p99'],
                      self.w_trivial)
        self.workload('calls_per_s', ['calls_per_s'], self.w_rate)
        self.workload('arg64', ['arg64_mb_s'], self.w_arg)
        self.workload('put/fetch', ['put_mb_s', 'fetch_mb_s'],
                      self.w_transfer)
        self.workload('fanout20', ['fanout20_s'], self.w_fanout)
        self.workload('connect_first_call', ['connect_first_call_ms'],
                      self.w_connect)
        self.r['shim'] = self.peer.shim or None
        self.notes[:0] = self.peer.notes
        return self.r

    def cleanup(self):
        with Watchdog(120, 'cleanup'):
            for fn in self.cleanups:
                try:
                    fn()
                except Exception as e:
                    log('cleanup step failed: %r' % (e,))
            if self.peer is not None:
                for c in self.open_conns:
                    self.peer.close(c)
                self.peer.shutdown()


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description='Benchmark a Python remote-execution library '
                    '(chopsticks, mitogen, execnet); prints one JSON object.')
    ap.add_argument('library', choices=LIBRARIES)
    ap.add_argument('transport', choices=TRANSPORTS)
    ap.add_argument('--ssh-config', help='OpenSSH client config (ssh -F)')
    ap.add_argument('--ssh-host', action='append', default=[],
                    help='host alias from the config; repeat, up to 20; the '
                         'first is used for single-host workloads')
    ap.add_argument('--ssh-user')
    ap.add_argument('--ssh-port', type=int)
    ap.add_argument('--ssh-key')
    ap.add_argument('--remote-python', default='python3',
                    help='python on ssh hosts (default: python3)')
    ap.add_argument('--ssh-compression', choices=('no', 'library-default'),
                    default='no',
                    help='"no" (default) forces ssh compression off for '
                         'every library (mitogen and execnet enable it by '
                         'default); "library-default" keeps their defaults')
    ap.add_argument('--quick', action='store_true',
                    help='small sizes and few iterations (smoke test)')
    ap.add_argument('--keep-going', action='store_true',
                    help='record a failed workload as null + note instead '
                         'of aborting')
    ap.add_argument('--timeout', type=int, default=900,
                    help='time limit per workload in seconds (default 900)')
    opts = ap.parse_args(argv)
    if opts.transport == 'ssh':
        if not opts.ssh_host:
            ap.error('ssh transport needs at least one --ssh-host')
        if len(opts.ssh_host) > FANOUT:
            ap.error('at most %d --ssh-host aliases' % FANOUT)
        if opts.ssh_config and not os.path.isfile(opts.ssh_config):
            ap.error('ssh config %r does not exist' % opts.ssh_config)
        if opts.ssh_config:
            opts.ssh_config = os.path.abspath(opts.ssh_config)
    return opts


def main(argv=None):
    opts = parse_args(sys.argv[1:] if argv is None else argv)

    # Only the final JSON may reach stdout: keep the real stdout aside and
    # point fd 1 (and sys.stdout) at stderr for the libraries and children.
    sys.stdout.flush()
    json_out = os.fdopen(os.dup(1), 'w')
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    bench = Bench(opts)
    code = 0
    result = None
    try:
        result = bench.run()
    except BenchError as e:
        sys.stderr.write('peers.py: %s/%s: ERROR: %s\n'
                         % (opts.library, opts.transport, e))
        code = 1
    except (Exception, WorkloadTimeout, KeyboardInterrupt) as e:
        traceback.print_exc(file=sys.stderr)
        sys.stderr.write('peers.py: %s/%s: ERROR: unexpected %s: %s\n'
                         % (opts.library, opts.transport,
                            type(e).__name__, e))
        code = 1
    finally:
        try:
            bench.cleanup()
        except (Exception, WorkloadTimeout) as e:
            sys.stderr.write('peers.py: cleanup failed: %r\n' % (e,))
    if result is not None:
        json_out.write(json.dumps(result) + '\n')
    json_out.flush()
    sys.stderr.flush()
    # Do not wait for lingering library threads; everything was closed.
    os._exit(code)


if __name__ == '__main__':
    main()
