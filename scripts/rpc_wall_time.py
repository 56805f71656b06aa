"""Wall time of `tvmgroup tune --model` over an RPC tracker with 1 and with 2 servers (127.0.0.1)."""
import os, signal, socket, subprocess, sys, time, tempfile
from pathlib import Path
MODEL = '''
import torch
from tvmgroup import GroupedLinear
def make():
    model = GroupedLinear(4, 32, 32)
    return model, torch.randn(256, 128)
'''
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]
def start(args, log):
    return subprocess.Popen([sys.executable, "-m", *args], stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
trials = int(sys.argv[1]) if len(sys.argv) > 1 else 16
for servers in (1, 2):
    work = Path(tempfile.mkdtemp()); (work / "m.py").write_text(MODEL)
    port = free_port(); key = "walltest"
    procs = [start(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)], work / "t.log")]
    time.sleep(2)
    for i in range(servers):
        sp = free_port()
        procs.append(start(["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(sp), "--port-end", str(sp + 1),
                            "--tracker", f"127.0.0.1:{port}", "--key", key], work / f"s{i}.log"))
    time.sleep(5)
    env = dict(os.environ, TVMGROUP_HOME=str(work / "home"), TVMGROUP_QUIET="1")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "tvmgroup.cli", "tune", "--model", f"{work}/m.py:make", "--rpc-tracker",
                          f"127.0.0.1:{port}", "--rpc-key", key, "--trials", str(trials), "--quiet"], env=env,
                         capture_output=True, text=True, timeout=1500)
    wall = time.perf_counter() - t0
    for p in procs:
        try: os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError: pass
    print(f"servers={servers} trials/op={trials} wall={wall:.0f}s rc={out.returncode}", flush=True)
    print(out.stdout[-1500:], out.stderr[-800:], flush=True)
