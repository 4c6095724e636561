#!/usr/bin/env python3
"""Write k8s/base/prometheusrule.yaml from deploy/prometheus/rules.yml.

rules.yml is the one source of truth for the captioner's recording rules and alerts;
Prometheus in docker-compose loads it directly, and the Prometheus operator gets the same
groups wrapped in a PrometheusRule. The groups are copied as text (comments included),
indented under `spec:`.

    python deploy/prometheus/sync_k8s_rules.py          # rewrite the PrometheusRule
    python deploy/prometheus/sync_k8s_rules.py --check  # exit 1 if it is stale
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "deploy" / "prometheus" / "rules.yml"
TARGET = ROOT / "k8s" / "base" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/rules.yml by deploy/prometheus/sync_k8s_rules.py.
# Do not edit: change rules.yml, then run `python deploy/prometheus/sync_k8s_rules.py`.
# tests/test_prometheus_rules.py fails when the two differ.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: captioner
  labels:
    app.kubernetes.io/name: captioner
    app.kubernetes.io/part-of: captioner
    # What kube-prometheus-stack's default ruleSelector matches; change it if yours differs.
    release: kube-prometheus-stack
spec:
"""


def render(source_text: str) -> str:
    """The PrometheusRule document for the rule-file text `source_text`."""
    lines = source_text.splitlines(keepends=True)
    for index, line in enumerate(lines):
        if line.startswith("groups:"):
            return HEADER + textwrap.indent("".join(lines[index:]), "  ")
    raise ValueError(f"{SOURCE} has no top-level 'groups:' key")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether it is stale")
    args = parser.parse_args(argv)
    wanted = render(SOURCE.read_text(encoding="utf-8"))
    current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
    if args.check:
        if current != wanted:
            print(f"{TARGET.relative_to(ROOT)} is stale: run {Path(__file__).relative_to(ROOT)}")
            return 1
        return 0
    if current != wanted:
        TARGET.write_text(wanted, encoding="utf-8")
        print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
