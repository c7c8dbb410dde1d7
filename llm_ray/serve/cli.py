"""``llm-ray serve``: start (or join) Ray, deploy the endpoint, print its URL, block until Ctrl-C."""

from __future__ import annotations

import json
import signal
import threading
import time

from llm_ray.config.serve import ServeConfig


def wait_ready(base_url: str, timeout_s: float = 600.0) -> None:
    """Poll ``GET /health`` until the replica answers 200 (the model is loaded). Over https the
    probe does not verify the certificate: it asks our own proxy whether it is up, on loopback,
    before any client trusts it (clients verify it as usual)."""
    import ssl
    import urllib.request

    context = None
    if base_url.startswith("https://"):
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=5, context=context) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base_url}/health did not answer 200 within {timeout_s:.0f}s")
        time.sleep(0.5)


def serve_forever(cfg: ServeConfig) -> None:
    import ray
    from ray import serve

    from llm_ray.serve.app import run, url

    # Joins the cluster in RAY_ADDRESS or a running local one, else starts a local cluster.
    ray.init(ignore_reinit_error=True, log_to_driver=True)
    node = getattr(ray._private.worker, "_global_node", None)
    started_here = node is not None and node.is_head()  # a local cluster of our own
    run(cfg)
    base = url(cfg)
    wait_ready(base)
    print(json.dumps({"model": cfg.served_name, "url": base, "routes": ["/v1/completions", "/v1/chat/completions", "/v1/models", "/health"]}))
    print(base, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if started_here:
            ray.shutdown()  # the cluster was ours: the app goes with it
        else:
            serve.delete(cfg.app_name)  # leave the shared cluster as we found it
