"""The functions Ray Data runs on its workers, one row per task (a JSON list of units).

`scan_batch` (stateless tasks) reads every JSONL or Parquet unit once to validate it and count
its documents and the ones the hash puts in val, remembering the document with the lowest split
score: if val comes out empty, that document is moved there. It also returns the skip records of
each unit (what the ReadPolicy leaves out), from which the driver writes skipped.jsonl in corpus
order. Errors come back as values (the first `DataError` of the task and its unit) so that the
driver reports the earliest bad file in corpus order with a clean message. (A text file is one
document named by its path: the driver decides about it itself, without this stage.)

`Tokenize` (an actor per CPU) receives the tokenizer once, through the object store, when it
starts; for each task it reads the units, splits documents by id, encodes each split's texts with
one `encode_batch_fast` call (a text with an overlong run of non-space characters as its pieces,
tokenizer.split_long_runs) and returns the concatenated ids (every document followed by EOS) as
raw bytes of the manifest dtype, plus counters as JSON.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa

from data_pipeline.documents import is_val, read_unit, val_score
from data_pipeline.sources import DataError, ReadPolicy
from data_pipeline.tokenizer import split_long_runs

TOKENIZED_SCHEMA = pa.schema(
    [("train", pa.large_binary()), ("val", pa.large_binary()), ("stats", pa.string())]
)


def scan_batch(batch: pa.Table, text_field: str, val_fraction: float,
               policy: ReadPolicy) -> pa.Table:
    results = []
    for units in batch.column("units").to_pylist():
        res: dict = {"docs": 0, "val": 0, "min": None, "error": None, "error_unit": None,
                     "skipped": []}  # skipped: [unit index in the task, records]
        for k, unit in enumerate(json.loads(units)):
            try:
                docs = read_unit(unit, text_field, policy)
            except DataError as e:
                res["error"], res["error_unit"] = str(e), k
                break
            if docs.skipped:
                res["skipped"].append([k, docs.skipped])
            res["docs"] += len(docs.ids)
            for doc_id in docs.ids:
                score = val_score(doc_id)
                res["val"] += score < val_fraction
                if res["min"] is None or (score, doc_id) < tuple(res["min"]):
                    res["min"] = [score, doc_id]
        results.append(json.dumps(res))
    return pa.table({"scan": results})


class Tokenize:
    """Ray Data actor: units -> token ids of the train and val documents, in document order."""

    def __init__(self, tokenizer_json: str, eos_id: int, dtype: str, text_field: str,
                 val_fraction: float, forced_val: str | None, policy: ReadPolicy):
        # One actor per CPU: the tokenizer's own thread pool would only oversubscribe the cores.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        from tokenizers import Tokenizer

        from data_pipeline.tokenizer import for_encoding

        # The tokenizer travels as JSON text once per actor (a restarted actor gets it again).
        self.tok = for_encoding(Tokenizer.from_str(tokenizer_json))
        self.eos, self.dtype = eos_id, np.dtype(dtype)
        self.text_field, self.val_fraction, self.forced_val = text_field, val_fraction, forced_val
        self.policy = policy

    def _encode(self, texts: list[str]) -> bytes:
        """Ids of all texts, each followed by EOS, as one flat array's bytes."""
        if not texts:
            return b""
        pieces: list[str] = []
        ends: list[int] = []  # ends[i]: pieces of texts[:i + 1]
        for text in texts:
            pieces += split_long_runs(text)
            ends.append(len(pieces))
        encodings = self.tok.encode_batch_fast(pieces, add_special_tokens=False)
        ids: list[int] = []
        eos, piece = self.eos, 0
        for end in ends:
            for enc in encodings[piece:end]:
                ids += enc.ids
            ids.append(eos)
            piece = end
        return np.array(ids, dtype=self.dtype).tobytes()

    def _task(self, units: list[dict]) -> dict:
        stats: dict = {"docs": [0, 0], "bytes": 0, "replaced": {}, "skipped": 0, "empty": 0,
                       "error": None}
        texts: tuple[list[str], list[str]] = ([], [])
        for unit in units:
            try:
                docs = read_unit(unit, self.text_field, self.policy)
            except DataError as e:
                stats["error"] = str(e)
                break
            stats["skipped"] += len(docs.skipped)  # the scan recorded them: only checked
            if docs.replaced:
                stats["replaced"][unit["path"]] = stats["replaced"].get(unit["path"], 0) \
                    + docs.replaced
            stats["bytes"] += docs.bytes
            stats["empty"] += docs.empty
            for doc_id, text in zip(docs.ids, docs.texts):
                texts[is_val(doc_id, self.val_fraction, self.forced_val)].append(text)
        stats["docs"] = [len(texts[0]), len(texts[1])]
        return {"train": self._encode(texts[0]), "val": self._encode(texts[1]),
                "stats": json.dumps(stats)}

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self._task(json.loads(units)) for units in batch.column("units").to_pylist()]
        return pa.Table.from_pylist(rows, schema=TOKENIZED_SCHEMA)
