"""Test helpers that read the proxy's /metrics text (Prometheus exposition format).

A ``Scrape`` parses one scrape once with prometheus_client's own parser, so a
test asserts on sample values by name and labels instead of matching text.
"""

from __future__ import annotations

from collections import Counter

from prometheus_client.parser import text_string_to_metric_families


class Scrape:
    """One /metrics scrape; ``total`` sums the samples whose labels include the given ones."""

    def __init__(self, text: str) -> None:
        self.samples = [
            (sample.name, dict(sample.labels), sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]

    def total(self, name: str, **labels: str) -> float:
        return sum(
            value
            for sample_name, sample_labels, value in self.samples
            if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items())
        )

    def label_sets(self, name: str) -> list[dict[str, str]]:
        return [labels for sample_name, labels, _ in self.samples if sample_name == name]

    def counts(self, name: str, *label_names: str) -> Counter[tuple[str, ...]]:
        """The counter ``name`` per value tuple of ``label_names`` (each sample must carry them)."""
        counts: Counter[tuple[str, ...]] = Counter()
        for sample_name, labels, value in self.samples:
            if sample_name == name:
                counts[tuple(labels[k] for k in label_names)] += int(value)
        return counts
