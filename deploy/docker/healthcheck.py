#!/usr/bin/env python3
"""Container health probe for the conspo services, installed as ``conspo-healthcheck``.

Standard library only, so the same file works in the slim CPU image and in the vLLM image
without importing conspo (a probe that loads torch would take seconds and hundreds of MB).

    conspo-healthcheck URL                 healthy when URL answers 2xx/3xx
    conspo-healthcheck --any-status URL    healthy when URL answers at all below 500: for the
                                           api, where every route may sit behind the token
    conspo-healthcheck                     probe what the environment configures: the
                                           Prometheus port (CONSPO_METRICS_PORT) if set, else
                                           the api port (CONSPO_PORT), else report healthy

Exit status 0 = healthy, 1 = unhealthy, as Docker's HEALTHCHECK expects.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request


def probe(url: str, *, any_status: bool, timeout: float) -> tuple[bool, str]:
    """Return (healthy, reason) for one HTTP GET."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return True, f"{url}: HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        healthy = any_status and exc.code < 500
        return healthy, f"{url}: HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"{url}: {reason}"


def default_target(env: dict[str, str]) -> tuple[str, bool] | None:
    """The URL a service started with ``env`` serves, and whether any status counts."""
    metrics = env.get("CONSPO_METRICS_PORT", "").strip()
    if metrics and metrics != "0":
        return f"http://127.0.0.1:{metrics}/metrics", False
    port = env.get("CONSPO_PORT", "").strip()
    if port and port != "0":
        return f"http://127.0.0.1:{port}/healthz", True
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conspo-healthcheck", description=__doc__.split("\n")[0])
    parser.add_argument("url", nargs="?", help="URL to GET (default: from the environment)")
    parser.add_argument("--any-status", action="store_true", help="any HTTP status < 500 is ok")
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds (default 4)")
    args = parser.parse_args(argv)

    if args.url:
        url, any_status = args.url, args.any_status
    else:
        target = default_target(dict(os.environ))
        if target is None:
            print("no probe configured (CONSPO_METRICS_PORT and CONSPO_PORT unset): healthy")
            return 0
        url, any_status = target[0], target[1] or args.any_status
    healthy, reason = probe(url, any_status=any_status, timeout=args.timeout)
    print(("healthy: " if healthy else "unhealthy: ") + reason)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
