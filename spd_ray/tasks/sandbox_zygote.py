"""The sandbox's zygote: spd_ray.tasks.sandbox runs this file by path in each sandbox, as
`python -S -B sandbox_zygote.py SCRATCH MODE`. It reads `Job`s from stdin, forks one child per job
(the child drops to the job's uid, sets the rlimits and runs the program), waits for it with the
job's timeout, kills whatever it left, and writes an `Answer` per job to stdout. The interpreter
starts once per sandbox, not per program.

Only builtin and standard modules before a program starts; marshal needs no import at all. Jobs
and answers cross the pipes as plain tuples (marshal takes no other kind), each framed by its
4-byte length. The parent imports this module for `Job` and `Answer` only: nothing runs then.
"""

import marshal
import os
import resource
import select
import signal
import sys
import time
from collections import namedtuple

# what the parent sends: the secret that starts the harness's result line, the uid to run as
# (None: the zygote's own), rlimits as (name, soft, hard), the (name, source) parts run in
# order, the wall-clock limit, and how many bytes of stderr's tail come back
Job = namedtuple("Job", "secret uid limits parts timeout_s max_err")
# what comes back: the harness's result line (b"" if none), the exit code, whether the wall
# clock ran out, stderr's tail, and whether nothing of the program is left (the box is reusable)
Answer = namedtuple("Answer", "result code timed_out tail clean")


def read_exactly(fd, n):
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))  # unbuffered: a later job is never read ahead
        if not chunk:
            return None
        data += chunk
    return data


def describe(err):
    try:
        text = str(err)
        return f"{type(err).__name__}: {text}"[:500] if text else type(err).__name__
    except BaseException:
        return type(err).__name__


def program(secret, uid, limits, parts, result):
    # the child: never returns
    def report(status, reason="", _write=os.write, _exit=os._exit, _fd=result, _key=secret,
               _flush=sys.stderr.flush):
        # bound now: a program that rebinds os.write or os._exit cannot change what this does
        try:
            _flush()  # what the program wrote to stderr, for the caller's tail
        except BaseException:
            pass
        _write(_fd, f"{_key} {status} {reason}"[:2000].encode("utf-8", "replace") + b"\n")
        _exit(0)  # nothing of the program runs after its result: no atexit hook, no thread
    os.setsid()
    # root outside: a fresh uid; clears CAP_SETUID/SETGID, the zygote's only ones
    if uid is not None:
        os.setgroups([]), os.setresgid(uid, uid, uid), os.setresuid(uid, uid, uid)
        try:  # setting a uid from a non-root one needs the capability the drop must have cleared
            os.setuid(0)
        except PermissionError:
            pass
        else:
            report("error", "sandbox: could not drop privileges")
    work = os.path.join(scratch, f"work-{os.getpid()}")
    os.mkdir(work, 0o700)
    os.chdir(work)
    for name, soft, hard in limits:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    try:
        code = [(name, compile(src, f"<{name}>", "exec", dont_inherit=True, optimize=0))
                for name, src in parts]
    except (SyntaxError, ValueError) as err:  # ValueError: null bytes (Python < 3.12)
        report("error", describe(err))
    import builtins
    import types
    builtins.exit = builtins.quit = sys.exit  # -S leaves them undefined
    # Like the HumanEval/MBPP harnesses, __name__ is not "__main__": a completion's demo block
    # (which often reads stdin) does not run. A registered module keeps pickle/dataclasses working.
    module = sys.modules["__sandbox__"] = types.ModuleType("__sandbox__")
    for name, obj in code:
        try:
            exec(obj, module.__dict__)
        except SystemExit as err:
            report("failed", f"{name} exited early ({describe(err)}) before the tests finished")
        except BaseException as err:
            report("failed", f"{name}: {describe(err)}")
    report("passed")


def remove(path):
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, 0o700)
            ok = all([remove(os.path.join(path, name)) for name in os.listdir(path)])
            os.rmdir(path)
            return ok
        os.unlink(path)
        return True
    except OSError:
        return False


def kill_all(passes, limit):
    # kill(-1): every process this one may signal but init and itself. It reports no error while
    # any is left in the namespace, so "none left" is told by the process limit: at `limit`, a
    # probe can be forked only once no other process of this uid (in this namespace) remains.
    soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    resource.setrlimit(resource.RLIMIT_NPROC, (limit, hard))
    try:
        for _ in range(passes):
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:  # not even one other process to signal
                return True
            try:
                probe = os.fork()
            except BlockingIOError:
                time.sleep(0.001)
                continue
            if probe == 0:
                os._exit(0)
            os.waitpid(probe, 0)
            return True
        return False
    finally:
        resource.setrlimit(resource.RLIMIT_NPROC, (soft, hard))


def remove_all(keep=()):
    names = [n for n in os.listdir(scratch) if os.path.join(scratch, n) not in keep]
    return all([remove(os.path.join(scratch, n)) for n in names])


def reap(uid, pid, keep, passes=2000):
    # Kill everything the program started and remove its files. True: nothing of it is left.
    # passes=1 kills once and leaves files: for a child still running, whose zombie we must reap
    # before the process limit can ever tell that none is left.
    if mode == "process":  # its process group; the sandbox is used once
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        return False
    if uid is None:  # a user namespace: all but init and this zygote are the program's
        return kill_all(passes, 3) and passes > 1 and remove_all(keep)
    reaper = os.fork()  # as root: the program ran as a uid of its own, which the reaper takes
    if reaper == 0:
        try:
            os.setgroups([]), os.setresgid(uid, uid, uid), os.setresuid(uid, uid, uid)
            if not kill_all(passes, 2) or passes == 1:
                os._exit(1)
            mine = [os.path.join(scratch, n) for n in os.listdir(scratch)]
            os._exit(0 if all([remove(p) for p in mine if os.lstat(p).st_uid == uid]) else 1)
        except BaseException:
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(reaper, 0)[1]) == 0


def run_job(n, job, null):
    r, w = os.pipe()
    err_path = os.path.join(scratch, f".stderr-{n}")
    err = os.open(err_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(null, 0), os.dup2(err, 2)
            os.closerange(3, w), os.closerange(w + 1, 1 << 16)  # only its result pipe stays
            program(job.secret, job.uid, job.limits, job.parts, w)
        finally:
            os._exit(1)
    os.close(w)
    pidfd = os.pidfd_open(pid)
    timed_out = not select.select([pidfd], [], [], job.timeout_s)[0]
    os.close(pidfd)
    if timed_out:  # as root the zygote may not signal another uid itself: its reaper does
        reap(job.uid, pid, (), passes=1)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    clean = reap(job.uid, pid, (err_path,))
    result = os.read(r, 4096) if select.select([r], [], [], 0)[0] else b""
    os.close(r)
    max_err = job.max_err
    tail = os.pread(err, max_err, max(0, os.fstat(err).st_size - max_err)) if max_err else b""
    os.close(err), os.unlink(err_path)
    return Answer(result, code, timed_out, tail, clean)


def main():
    jobs_in, results_out = 0, os.dup(1)
    if mode == "isolated" and os.getuid() != 0:  # the programs share our uid: let none ptrace us
        import ctypes
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 1)
    for n in range(10**9):
        header = read_exactly(jobs_in, 4)
        if header is None:
            break
        job = Job._make(marshal.loads(read_exactly(jobs_in, int.from_bytes(header, "big"))))
        out = marshal.dumps(tuple(run_job(n, job, null)))
        out = len(out).to_bytes(4, "big") + out
        while out:
            out = out[os.write(results_out, out):]


if __name__ == "__main__":
    sys.path[0] = ""  # as under -c: the working directory, never this file's folder
    scratch, mode = sys.argv[1], sys.argv[2]
    main()
