"""`make image-smoke`: the four services from the built image, run the way deploy/k8s/overlays/dev runs them.

Each service runs in its own container with podman (no daemon) on the host's loopback network, with what its
rendered Deployment says: the command, runAsUser/runAsGroup, a read-only root filesystem with only the
pod's emptyDir mounts writable (/tmp, /cache, as tmpfs of the same size), all capabilities dropped, no new
privileges, and the ConfigMap's environment. What a cluster gives and loopback does not is replaced, and
printed: peer addresses (127.0.0.1 instead of headless Services), listen hosts, and the Redis and Qdrant
Deployments (the cacher's private redis-server and the retriever's embedded Qdrant under /cache instead).

Then: readiness of all four through grpc.health.v1, reflection on each port lists its service, a TIL for
examples/sample.diff streams through the edge with grpcurl, every container stops on SIGTERM with exit
status 0. Prints the image size, the build time `make image` recorded, and each service's start time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SERVICES = ("generator", "retriever", "cacher", "edge")  # start order: the edge waits for its peers
FULL_NAME = {s: f"til.v1.{s.capitalize()}Service" for s in SERVICES}
NAME_PREFIX = "tilserve-smoke-"


def say(message: str) -> None:
    print(f"\033[1m[image-smoke]\033[0m {message}", flush=True)


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, text=True, capture_output=True, check=False, **kwargs)


def tool(name: str) -> str:
    found = shutil.which(name, path=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]))
    if found is None:
        sys.exit(f"image-smoke: {name} not found (make setup installs grpcurl and kubectl into .venv/bin)")
    return found


class Podman:
    """podman with the storage `make image` built into. runc and cgroupfs: crun refuses hybrid cgroup
    hierarchies (cgroup v1 plus a v2 mount, as in many VMs), and no systemd is needed. The rlimits are
    this shell's own, since podman's defaults (1M files and processes) can exceed what a sandbox allows."""

    def __init__(self, storage_driver: str, runtime: str) -> None:
        self.base = ["podman", "--storage-driver", storage_driver, "--cgroup-manager", "cgroupfs"]
        if runtime:
            self.base += ["--runtime", runtime]
        if os.geteuid() != 0:
            self.base.insert(0, "sudo")

    def __call__(self, *args: str, check: bool = True) -> str:
        out = run([*self.base, *args])
        if check and out.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args[:2])}: {out.stderr.strip()}")
        return out.stdout.strip()

    def logs(self, name: str, lines: int = 25) -> str:
        out = run([*self.base, "logs", "--tail", str(lines), name])
        return (out.stdout + out.stderr).strip()

    def ulimits(self) -> list[str]:
        import resource

        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[0], 65536) // 2
        return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


def render(overlay: str) -> list[dict[str, Any]]:
    out = run([tool("kubectl"), "kustomize", str(ROOT / "deploy" / "k8s" / "overlays" / overlay)])
    if out.returncode != 0:
        sys.exit(f"kubectl kustomize {overlay}: {out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def pod_spec(docs: list[dict[str, Any]], service: str) -> dict[str, Any]:
    """What the Deployment runs: command, uid/gid, writable mounts and their sizes, environment."""

    def get(kind: str, name: str) -> dict[str, Any]:
        return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)

    pod = get("Deployment", service)["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == service)
    sizes = {v["name"]: v["emptyDir"].get("sizeLimit") for v in pod.get("volumes", []) if "emptyDir" in v}
    mounts = {
        m["mountPath"]: sizes[m["name"]] for m in container.get("volumeMounts", []) if m["name"] in sizes
    }
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(get("ConfigMap", source["configMapRef"]["name"]).get("data", {}))
    env.update({v["name"]: v["value"] for v in container.get("env", [])})
    security = container.get("securityContext", {})
    return {
        "command": container["command"],
        "user": f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}",
        "read_only": security.get("readOnlyRootFilesystem", False),
        "drop_all": "ALL" in security.get("capabilities", {}).get("drop", []),
        "no_new_privileges": security.get("allowPrivilegeEscalation") is False,
        "mounts": mounts,
        "env": env,
        "port": int(env[f"{service.upper()}_PORT"]),
        "metrics_port": int(env[f"{service.upper()}_METRICS_PORT"]),
    }


def tmpfs_size(limit: str | None) -> str:
    if not limit:
        return ""
    units = {"Ki": "k", "Mi": "m", "Gi": "g"}
    return ",size=" + next((limit[: -len(u)] + s for u, s in units.items() if limit.endswith(u)), limit)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def loopback_overrides(specs: dict[str, dict[str, Any]], offset: int) -> dict[str, dict[str, str]]:
    """The environment a cluster provides that loopback has to replace."""
    port = {s: specs[s]["port"] + offset for s in SERVICES}
    changes: dict[str, dict[str, str]] = {s: {} for s in SERVICES}
    for s in SERVICES:
        changes[s][f"{s.upper()}_HOST"] = "127.0.0.1"
        if offset:
            changes[s][f"{s.upper()}_PORT"] = str(port[s])
            changes[s][f"{s.upper()}_METRICS_PORT"] = str(specs[s]["metrics_port"] + offset)
    for peer in ("generator", "retriever", "cacher"):
        changes["edge"][f"EDGE_{peer.upper()}_ADDR"] = f"127.0.0.1:{port[peer]}"
    # Nothing enforces the pod's CPU limit here: llama.cpp takes the service's default (half of this machine's
    # CPUs) instead of a thread per CPU of the limit, as OpenMP threads spin on an oversubscribed host.
    changes["generator"]["GENERATOR_N_THREADS"] = "0"
    # No redis Deployment: the cacher's private redis-server (a unix socket in /tmp), shipped in the image.
    changes["cacher"]["CACHER_REDIS_URL"] = ""
    # No qdrant StatefulSet: embedded Qdrant in the pod's /cache emptyDir.
    changes["retriever"]["RETRIEVER_QDRANT_URL"] = ""
    changes["retriever"]["RETRIEVER_QDRANT_PATH"] = "/cache/qdrant"
    return changes


def grpcurl(*args: str, stdin: str | None = None, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return run([tool("grpcurl"), "-plaintext", *args], input=stdin, timeout=timeout)


def serving(port: int, name: str) -> bool:
    try:
        out = grpcurl("-d", json.dumps({"service": name}), f"127.0.0.1:{port}", "grpc.health.v1.Health/Check")
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0 and json.loads(out.stdout).get("status") == "SERVING"


@contextmanager
def containers(podman: Podman) -> Iterator[list[str]]:
    started: list[str] = []
    passed = False
    try:
        yield started
        passed = True
    finally:
        for name in reversed(started):
            if not passed:
                print(f"--- {name}: last lines ---\n{podman.logs(name)}", file=sys.stderr)
            podman("rm", "--force", "--time", "5", name, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=os.environ.get("IMAGE", "tilserve-cpu:dev"))
    parser.add_argument("--overlay", default="dev")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for all four to become ready")
    parser.add_argument("--til-timeout", type=float, default=900, help="seconds for the TIL to stream")
    parser.add_argument("--storage-driver", default=os.environ.get("STORAGE_DRIVER", ""))
    parser.add_argument("--runtime", default=os.environ.get("SMOKE_RUNTIME", "runc"))
    args = parser.parse_args()
    missing = [t for t in ("podman", args.runtime) if t and shutil.which(t) is None]
    if missing:
        say(f"installing {' '.join(missing)} (apt)")
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        apt = [*sudo, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]
        if (
            run([*apt, "update", "-qq"]).returncode
            or run([*apt, "install", "-y", "-qq", *missing]).returncode
        ):
            sys.exit(f"image-smoke: needs {' '.join(missing)}: apt-get install {' '.join(missing)}")
    driver = args.storage_driver or (
        "overlay" if "overlay" in Path("/proc/filesystems").read_text() else "vfs"
    )
    podman = Podman(driver, args.runtime)
    image = args.image if "/" in args.image else f"localhost/{args.image}"

    info = json.loads(podman("image", "inspect", image))[0]
    size_mb = info["Size"] / 1e6
    build = ROOT / ".run" / "image-build.json"
    built = json.loads(build.read_text()) if build.is_file() else {}
    say(f"image {image}: {size_mb:.0f} MB, {len(info['RootFS']['Layers'])} layers")
    if built.get("image") == args.image:
        say(f"make image took {built['total_s']} s (base {built['base_s']} s, image {built['image_s']} s)")

    # Nothing of the build machine is in the image: not its CA bundle, and none of the paths `make image`
    # mounted into the build (its pip configuration, local wheel folders and indexes) exist there at all.
    host_ca = Path("/etc/ssl/certs/ca-certificates.crt")
    host_sha = run(["sha256sum", str(host_ca)]).stdout[:64] if host_ca.is_file() else "-"
    mounted = built.get("mounted") or ["/etc/pip.conf"]
    found = podman(
        "run", "--rm", "--network", "none", *podman.ulimits(), image, "sh", "-c",
        f"sha256sum {host_ca} | cut -c1-64; for p in \"$@\"; do [ -e \"$p\" ] && echo \"$p\"; done; true",
        "sh", *mounted,
    ).split()  # fmt: skip
    if found[0] == host_sha or found[1:]:
        sys.exit(f"image-smoke: the image carries this machine's CA bundle or build mounts: {found}")
    say(f"not in the image: this machine's CA bundle, {', '.join(mounted)}")

    docs = render(args.overlay)
    specs = {s: pod_spec(docs, s) for s in SERVICES}
    wanted = [p for s in SERVICES for p in (specs[s]["port"], specs[s]["metrics_port"])]
    offset = next(o for o in range(0, 20000, 1000) if all(port_free(p + o) for p in wanted))
    changes = loopback_overrides(specs, offset)
    if offset:
        say(f"the manifests' ports are taken here: every port + {offset}")

    with containers(podman) as started, tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        for s in SERVICES:
            spec = specs[s]
            env = {**spec["env"], **changes[s]}
            env_file = Path(tmp, f"{s}.env")
            env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
            flags = ["--detach", "--name", f"{NAME_PREFIX}{s}", "--network", "host", "--user", spec["user"]]
            flags += ["--env-file", str(env_file), *podman.ulimits()]
            if spec["read_only"]:
                flags += ["--read-only", "--read-only-tmpfs=false"]
            if spec["drop_all"]:
                flags += ["--cap-drop", "ALL"]
            if spec["no_new_privileges"]:
                flags += ["--security-opt", "no-new-privileges"]
            for path, limit in spec["mounts"].items():
                flags += ["--tmpfs", f"{path}:rw,mode=1777{tmpfs_size(limit)}"]
            podman("rm", "--force", f"{NAME_PREFIX}{s}", check=False)
            podman("run", *flags, image, *spec["command"])
            started.append(f"{NAME_PREFIX}{s}")
            writable = ", ".join(spec["mounts"]) or "nothing"
            say(
                f"{s}: uid:gid {spec['user']}, read-only root: {spec['read_only']}, writable: {writable}; "
                f"changed for loopback: {changes[s]}"
            )

        ready: dict[str, float] = {}
        while len(ready) < len(SERVICES):
            for s in SERVICES:
                if s not in ready and serving(specs[s]["port"] + offset, FULL_NAME[s]):
                    ready[s] = time.monotonic() - t0
                    say(f"{s} SERVING ({FULL_NAME[s]}) after {ready[s]:.1f} s")
            for name in started:
                if podman("inspect", "--format", "{{.State.Running}}", name) != "true":
                    sys.exit(f"image-smoke: {name} exited before it was ready")
            if time.monotonic() - t0 > args.timeout:
                sys.exit(f"image-smoke: not ready after {args.timeout:.0f} s: {set(SERVICES) - set(ready)}")
            time.sleep(1)
        say(f"all four ready {max(ready.values()):.1f} s after the first container started")

        for s in SERVICES:
            listed = grpcurl(f"127.0.0.1:{specs[s]['port'] + offset}", "list").stdout.split()
            for name in (FULL_NAME[s], "grpc.health.v1.Health"):
                if name not in listed:
                    sys.exit(f"image-smoke: reflection on {s} does not list {name}: {listed}")
        say("reflection lists " + ", ".join(FULL_NAME[s] for s in SERVICES) + " (one per port)")

        request = {
            "diff": (ROOT / "examples" / "sample.diff").read_text(),
            "commitMessages": ["Cache answers in Redis"],
            "date": "2026-11-24",
        }
        t1 = time.monotonic()
        out = grpcurl(
            "-emit-defaults", "-max-time", str(args.til_timeout), "-d", "@", f"127.0.0.1:{specs['edge']['port'] + offset}",
            "til.v1.EdgeService/GenerateTil", stdin=json.dumps(request), timeout=args.til_timeout + 30,
        )  # fmt: skip
        if out.returncode != 0:
            sys.exit(f"image-smoke: GenerateTil failed: {out.stderr.strip()}")
        messages = list(_json_stream(out.stdout))
        deltas = [m for m in messages if "delta" in m]
        finished = messages[-1].get("finished") if messages else None
        if not messages or "started" not in messages[0] or not deltas or not finished:
            sys.exit(f"image-smoke: not a TIL stream: {out.stdout[:2000]}")
        til = finished.get("til") or {}
        say(
            f"GenerateTil streamed {len(deltas)} deltas in {time.monotonic() - t1:.1f} s: "
            f"title {til.get('title')!r}, keywords {til.get('keywords')}, "
            f"finish {finished.get('finish_reason')}, {len(finished.get('violations') or [])} format violations, "
            f"usage {finished.get('usage')}, timings {finished.get('timings')}"
        )

        for name in reversed(started):
            podman("stop", "--time", "60", name)
            code = podman("inspect", "--format", "{{.State.ExitCode}}", name)
            if code != "0":
                sys.exit(f"image-smoke: {name} exited {code} on SIGTERM")
        say("stopped: all four drained and exited 0 on SIGTERM")
    print(
        json.dumps(
            {
                "image": image,
                "size_mb": round(size_mb),
                "build_s": built.get("total_s"),
                "ready_s": {s: round(t, 1) for s, t in ready.items()},
                "til_title": til.get("title"),
            }
        )
    )
    return 0


def _json_stream(text: str) -> Iterator[dict[str, Any]]:
    """grpcurl prints one pretty-printed JSON object per streamed message."""
    decoder = json.JSONDecoder()
    text = text.strip()
    while text:
        obj, end = decoder.raw_decode(text)
        yield obj
        text = text[end:].strip()


if __name__ == "__main__":
    sys.exit(main())
