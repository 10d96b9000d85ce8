"""Pre-flight, the one reader of a whole split: read every sample, prove every image whole, measure
the real token length (when a measure is given), apply the recipe's policies.

Training, `vlmtune data check` and eval all read through here, so a bad sample is reported the
same way everywhere and stops a run in its first minutes instead of an hour in. Every skipped or
dropped sample is listed with its index, field and reason.

Records are read and normalised here, in order, 64 at a time; each chunk is then checked, in this
process or, for large sets, in forked worker processes (data.check_workers), a bounded number of
chunks in flight. A chunk's images are opened, checked and released before its results come back, so a
100k-sample set costs the memory of a few chunks plus the list of (lazy) kept samples.

How a sample is measured:
- with a TokenCounter (the default of training and `data check`): images are proven whole without
  being decoded (vlmtune.data.images.image_size) and lengths come from their sizes (vlmtune.data.lengths),
  the same numbers as the processor's; the first samples are also measured by the processor, and
  any disagreement switches the split to the processor, with a note in the report;
- with a plain ``Measure`` (``collator.count_tokens``): every image decoded and the sample measured
  by the processor, one at a time: exact and slow (the pre-flight before the fast path);
- with none: images are checked, no length is measured.
"""

from __future__ import annotations

import os
import statistics
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from vlmtune.data import Problem, Sample, SampleError, SampleReader, invalid_samples_error, open_records
from vlmtune.data.images import FIRST_FRAME, ImageProblem, frames_of, image_facts, open_image
from vlmtune.data.lengths import TokenCounter
from vlmtune.distributed import from_writer
from vlmtune.errors import DataError, VlmtuneError
from vlmtune.recipe import DataSection
from vlmtune.redact import redact_text

Measure = Callable[[Sample], int]  # tokens of a sample whose images are decoded (collator.count_tokens)

CHUNK = 64  # samples per unit of work
AUTO_WORKERS_FROM = 5_000  # data.check_workers: null uses worker processes from this many samples on
AUTO_WORKERS_MIN_CORES = 4  # ... on machines with this many cores or more
MAX_AUTO_WORKERS = 8
VERIFY_SAMPLES = 8  # samples with images measured both ways before the fast count is trusted


@dataclass
class CheckedSplit:
    """What the pre-flight found in one split: the usable samples and every problem."""

    name: str
    source: str
    total: int
    samples: list[Sample]  # the usable ones, images still lazy
    skipped: list[Problem] = field(default_factory=list)
    too_long: list[Problem] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # tokens per kept sample; empty when not measured
    max_length: int | None = None
    formats: Counter = field(default_factory=Counter)
    images_over_budget: int = 0  # images the processor shrinks to data.max_image_pixels
    images_multi_frame: int = 0  # animations and multi-page TIFFs kept, trained on their first frame
    max_image_pixels: int | None = None
    image_check: str = "fast"
    measured_by: str | None = None  # how the lengths were measured, in words

    @property
    def problems(self) -> list[Problem]:
        """Every skipped and dropped sample, in the order of the data."""
        return sorted([*self.skipped, *self.too_long], key=lambda p: p.index)

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "samples_total": self.total,
            "samples_kept": len(self.samples),
            "skipped_invalid": [vars(p) for p in self.skipped],
            "dropped_too_long": [vars(p) for p in self.too_long],
            "formats": dict(self.formats),
            "max_length": self.max_length,
            "tokens": _percentiles(self.lengths),
            "tokens_measured_by": self.measured_by,
            "images_per_sample": _percentiles([s.n_images for s in self.samples]),
            "images_total": sum(s.n_images for s in self.samples),
            "text_only_samples": sum(not s.images for s in self.samples),
            "image_check": self.image_check,
            "max_image_pixels": self.max_image_pixels,
            "images_over_pixel_budget": self.images_over_budget,
            "images_multi_frame": self.images_multi_frame,
        }


def _percentiles(values: list[int]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)

    def pct(q: float) -> int:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {
        "min": ordered[0],
        "p50": pct(0.5),
        "p90": pct(0.9),
        "p99": pct(0.99),
        "max": ordered[-1],
        "mean": round(statistics.fmean(ordered), 1),
    }


# --- checking samples ------------------------------------------------------------------------------


class Outcome(NamedTuple):
    """What checking one sample found: its length (None: not measured), or the problem."""

    length: int | None = None
    over_budget: int = 0  # its images above the pixel budget
    problem: SampleError | None = None
    multi_frame: int = 0  # its images with more than one frame (trained on their first)


@dataclass(frozen=True)
class ImageRules:
    max_side: int
    max_pixels: int | None
    decode: bool  # data.image_check: full
    multi_frame: str = FIRST_FRAME  # data.multi_frame_images

    @classmethod
    def of(cls, data: DataSection) -> ImageRules:
        return cls(
            data.max_image_side, data.max_image_pixels, data.image_check == "full", data.multi_frame_images
        )

    def over_budget(self, sizes: list[tuple[int, int]]) -> int:
        return sum(self.max_pixels is not None and w * h > self.max_pixels for w, h in sizes)


@dataclass
class FastChecker:
    """Images proven whole from their bytes, lengths from their sizes (see vlmtune.data.lengths)."""

    rules: ImageRules
    counter: TokenCounter | None = None

    def check(self, samples: list[Sample]) -> list[Outcome]:
        facts = [self._facts(s) for s in samples]
        sizes = [f if isinstance(f, SampleError) else [size for size, _ in f] for f in facts]
        good = [i for i, s in enumerate(sizes) if not isinstance(s, SampleError)]
        lengths: list[int | None] = [None] * len(samples)
        if self.counter is not None and good:
            counted = self.counter.count([samples[i] for i in good], [sizes[i] for i in good])
            for i, length in zip(good, counted, strict=True):
                lengths[i] = length
        outcomes = []
        for sample, sample_facts, sample_sizes, length in zip(samples, facts, sizes, lengths, strict=True):
            if isinstance(sample_sizes, SampleError):
                outcomes.append(Outcome(problem=sample_sizes))
            elif self.counter is not None and length is None:  # only the processor can tell
                outcomes.append(_measured(sample, self.rules, self.counter.collator.count_tokens))
            else:
                multi = sum(frames > 1 for _, frames in sample_facts)
                outcomes.append(Outcome(length, self.rules.over_budget(sample_sizes), multi_frame=multi))
        return outcomes

    def _facts(self, sample: Sample) -> list[tuple[tuple[int, int], int]] | SampleError:
        facts = []
        rules = self.rules
        for i, source in enumerate(sample.images):
            try:
                facts.append(
                    image_facts(
                        source, max_side=rules.max_side, decode=rules.decode, multi_frame=rules.multi_frame
                    )
                )
            except ImageProblem as exc:
                return SampleError(sample.image_field(i), exc.reason)
        return facts

    def verified(self, samples: list[Sample]) -> tuple[Checker, str | None]:
        """This checker if its counts equal the processor's on the first samples, else the processor's."""
        if self.counter is None:
            return self, None
        with_images = [s for s in samples if s.images][:VERIFY_SAMPLES]
        probe = with_images + [s for s in samples if not s.images][:2]
        exact = ExactChecker(self.rules, self.counter.collator.count_tokens)
        for sample, fast, slow in zip(probe, self.check(probe), exact.check(probe), strict=True):
            # Only lengths are compared: a PNG corrupt behind valid checksums fails the decoding
            # check alone, which says nothing about the count.
            if None not in (fast.length, slow.length) and fast.length != slow.length:
                note = (
                    f"the processor: the count from image sizes disagreed on sample {sample.index} "
                    f"({fast.length} vs {slow.length} tokens), so every sample was measured by the processor"
                )
                return exact, note
        return self, f"image sizes (checked against the processor on {len(probe)} samples)"


@dataclass
class ExactChecker:
    """Every image decoded and the sample measured by the processor, as training would batch it."""

    rules: ImageRules
    measure: Measure | None = None

    def check(self, samples: list[Sample]) -> list[Outcome]:
        return [_measured(sample, self.rules, self.measure) for sample in samples]

    def verified(self, samples: list[Sample]) -> tuple[Checker, str | None]:
        return self, "the processor" if self.measure else None


Checker = FastChecker | ExactChecker


def _measured(sample: Sample, rules: ImageRules, measure: Measure | None) -> Outcome:
    """Decode every image, measure with the processor, release the images."""
    opened = []
    try:
        for i, source in enumerate(sample.images):
            try:
                opened.append(open_image(source, max_side=rules.max_side, multi_frame=rules.multi_frame))
            except ImageProblem as exc:
                return Outcome(problem=SampleError(sample.image_field(i), exc.reason))
        over = rules.over_budget([im.size for im in opened])
        multi = sum(frames_of(im) > 1 for im in opened)
        if measure is None:
            return Outcome(None, over, multi_frame=multi)
        decoded = replace(sample, images=opened)
        try:
            return Outcome(measure(decoded), over, multi_frame=multi)
        except VlmtuneError:
            raise
        except Exception as exc:  # the processor refuses what it cannot take (e.g. an extreme aspect ratio)
            return Outcome(
                problem=SampleError("processor", f"the model's processor refused the sample ({exc})")
            )
    finally:
        for image, source in zip(opened, sample.images, strict=False):
            if image is not source:
                image.close()


def checker_for(data: DataSection, measure: TokenCounter | Measure | None) -> Checker:
    rules = ImageRules.of(data)
    if measure is None or isinstance(measure, TokenCounter):
        return FastChecker(rules, measure)
    return ExactChecker(rules, measure)


# --- scanning ----------------------------------------------------------------------------------


def scan_split(
    name: str,
    source: str,
    data: DataSection,
    max_length: int | None = None,
    measure: TokenCounter | Measure | None = None,
    console: Any = None,
    *,
    split: str | None = None,
    reader: Any = SampleReader,
) -> CheckedSplit:
    """Every sample of one split checked (and measured, given ``measure``); problems collected, never raised.

    ``measure`` is a TokenCounter (lengths from image sizes, checked against the processor), a
    ``Measure`` called with the sample's images decoded (exact, slow), or None (no lengths, and no
    length limit applies). ``split`` names the split of a saved or hub dataset (default: the data
    section's train or eval split, after ``name``). ``reader``: the class that reads one record (SFT
    samples; vlmtune.data.preference.PairReader reads preference pairs, which the measure then gets).
    """
    if split is None:
        split = data.train_split if name == "train" else data.eval_split
    records = open_records(source, split, data.subset)
    reading = reader.from_section(data, records.root, records.table)
    report = CheckedSplit(
        name,
        redact_text(records.source),
        0,
        [],
        max_length=max_length,
        max_image_pixels=data.max_image_pixels,
        image_check=data.image_check,
    )
    chunks = _read_chunks(records.rows, reading)
    first = next(chunks, None)
    if first is None:
        return report
    checker, report.measured_by = checker_for(data, measure).verified(_samples(first))
    workers = _workers(data.check_workers, records.total)
    with _progress(console, f"checking {name}", records.total) as advance:
        for chunk, outcomes in _checked(_prepend(first, chunks), checker, workers):
            _add(report, chunk, outcomes)
            advance(len(chunk))
    return report


def _read_chunks(rows: Iterable[tuple[int, Any]], reader: Any) -> Iterator[list]:
    """(index, sample or SampleError) pairs, CHUNK at a time, in the order of the data."""
    chunk: list = []
    for index, record in rows:
        try:
            chunk.append((index, reader.read(index, record)))
        except SampleError as exc:
            chunk.append((index, exc))
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _prepend(first: list, rest: Iterator[list]) -> Iterator[list]:
    yield first
    yield from rest


def _samples(chunk: list) -> list[Sample]:
    """The readable items of a chunk: Samples, or whatever the reader reads (preference pairs)."""
    return [item for _, item in chunk if not isinstance(item, SampleError)]


def _add(report: CheckedSplit, chunk: list, outcomes: list[Outcome]) -> None:
    """One checked chunk into the report, in the order of the data."""
    pending = iter(outcomes)
    for index, item in chunk:
        report.total += 1
        outcome = Outcome(problem=item) if isinstance(item, SampleError) else next(pending)
        if outcome.problem is not None:  # URLs in a reason lose their credentials (it is written and printed)
            report.skipped.append(Problem(index, outcome.problem.field, redact_text(outcome.problem.reason)))
            continue
        report.formats[item.format] += 1
        length, limit = outcome.length, report.max_length
        if length is not None and limit is not None and length > limit:
            reason = f"{length} tokens (image tokens included) > max_length {limit}"
            report.too_long.append(Problem(index, "tokens", reason))
            continue
        report.samples.append(item)
        if length is not None:
            report.lengths.append(length)
        report.images_over_budget += outcome.over_budget
        report.images_multi_frame += outcome.multi_frame


def _workers(setting: int | None, total: int | None) -> int:
    """data.check_workers, or for null: one process per core but one (which reads the records) on
    machines of AUTO_WORKERS_MIN_CORES cores or more. On 2 cores, workers cost more than they give
    (docs/benchmarks.md); the checking they take over is about 90% of the work."""
    if setting is not None:
        return setting
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if total is None or total < AUTO_WORKERS_FROM or cores < AUTO_WORKERS_MIN_CORES:
        return 0
    return min(cores - 1, MAX_AUTO_WORKERS)


# --- running the checks ------------------------------------------------------------------------

_worker_checker: Checker | None = None  # what forked workers inherit


def _check_in_worker(samples: list[Sample]) -> list[Outcome]:
    assert _worker_checker is not None, "worker forked without a checker"
    return _worker_checker.check(samples)


def _quiet_torch_threads() -> None:
    """One torch thread per worker (as DataLoader workers do): the workers are the parallelism."""
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _checked(chunks: Iterator[list], checker: Checker, workers: int) -> Iterator[tuple[list, list[Outcome]]]:
    """(chunk, outcomes) in order: here when ``workers`` is 0, else in that many worker processes.

    Workers are forked, so they inherit the checker (processor, tokenizer, cache) instead of
    rebuilding it; only chunks of samples travel. At most 2 chunks per worker are in flight, so
    memory stays bounded. Where fork is not available (macOS, Windows) the check runs here.
    """
    global _worker_checker
    import multiprocessing

    if workers <= 0 or "fork" not in multiprocessing.get_all_start_methods():
        for chunk in chunks:
            yield chunk, checker.check(_samples(chunk))
        return
    from concurrent.futures import ProcessPoolExecutor

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # a forked tokenizer must not spawn threads
    _worker_checker = checker
    context = multiprocessing.get_context("fork")
    try:
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_quiet_torch_threads) as pool:
            in_flight: deque = deque()
            try:
                for chunk in chunks:
                    in_flight.append((chunk, pool.submit(_check_in_worker, _samples(chunk))))
                    if len(in_flight) >= 2 * workers:
                        done, future = in_flight.popleft()
                        yield done, future.result()
                while in_flight:
                    done, future = in_flight.popleft()
                    yield done, future.result()
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        _worker_checker = None


@contextmanager
def _progress(console: Any, label: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A rich progress bar with samples/s on a terminal (stderr by default); nothing when redirected."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:,.0f} samples/s" if speed else "", style="progress.data.speed")

    console = console or Console(stderr=True)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        Rate(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


# --- policies ----------------------------------------------------------------------------------


def check_split(
    name: str,
    path: str,
    data: DataSection,
    max_length: int | None = None,
    measure: TokenCounter | Measure | None = None,
    console: Any = None,
    *,
    split: str | None = None,
    reader: Any = SampleReader,
) -> CheckedSplit:
    """Scan a split, then raise or drop per data.on_bad_sample / data.too_long (all problems at once).

    Under torchrun only rank 0 reads and checks the data; the other ranks receive its result (the
    kept samples, pairs or prompts hold lazy image sources, so what travels is small) or its error.
    """
    return from_writer(lambda: _check_split(name, path, data, max_length, measure, console, split, reader))


def _check_split(
    name: str,
    path: str,
    data: DataSection,
    max_length: int | None,
    measure: TokenCounter | Measure | None,
    console: Any,
    split: str | None,
    reader: Any,
) -> CheckedSplit:
    report = scan_split(name, path, data, max_length, measure, console, split=split, reader=reader)
    if report.images_multi_frame:
        import sys

        print(
            f"warning: {report.source}: {report.images_multi_frame} image(s) are animations or multi-page TIFFs; "
            "they train on their first frame (data.multi_frame_images: error refuses them)",
            file=sys.stderr,
        )
    if report.skipped and data.on_bad_sample == "error":
        raise invalid_samples_error(report.source, report.skipped, report.total)
    if report.too_long and data.too_long == "error":
        first = report.too_long[0]
        raise DataError(
            f"{report.source}: {len(report.too_long)} sample(s) exceed train.max_length={max_length}; the first "
            f"is sample {first.index} ({first.reason})",
            hint="vlmtune never cuts image tokens: raise train.max_length, lower data.max_image_pixels, or set "
            "data.too_long: drop to train without them (they are listed in 3-train/data_report.json)",
        )
    if not report.samples:
        listed = "".join(f"\n  - {p}" for p in report.problems[:20])
        raise DataError(
            f"{report.source}: no usable samples: no sample is left to train on ({report.total} read){listed}",
            hint="`vlmtune data check RECIPE` lists every problem; docs/data.md shows the layouts vlmtune reads",
        )
    return report


def read_split(source: str, data: DataSection, *, split: str | None = None) -> CheckedSplit:
    """The usable samples of a source read with a recipe's data settings, images checked, no model.

    The recipe's bad-sample policy applies; lengths are not measured (that needs the processor).
    """
    return check_split("train", source, data, split=split or data.train_split)
