"""`lmforge index` and `lmforge search`: a local index of your documents (SQLite FTS5, BM25; with
`--embed MODEL` also one vector per chunk, and search is then hybrid).

The library side is `lmforge/retrieval/` (chunking that follows the documents' structure, and the index);
these commands only gather the files, report what was skipped, and print results.
"""

from __future__ import annotations

import argparse
import sys

from lmforge.cli.common import Formatter, add_progress_flag, para, positive_int
from lmforge.errors import UserError

BUILTIN_PYDOCS = "builtin:pydocs"


def cmd_index(args) -> int:
    from lmforge.retrieval.index import Index, collect_files, index_path

    sources = [p for p in args.paths if p != BUILTIN_PYDOCS]
    walk = collect_files(sources, strict=args.strict) if sources else None
    files = []
    if walk is not None:
        files += list(walk)
    if BUILTIN_PYDOCS in args.paths:
        from lmforge.data.pydocs import named_documents

        files += list(named_documents(BUILTIN_PYDOCS))
    if not files:
        raise UserError(f"nothing to index in {', '.join(args.paths)} (indexed: .md .markdown .txt .rst .py files)")
    path = index_path(args.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    index = Index(path, max_chars=args.max_chars, overlap=args.overlap, rebuild=args.rebuild)
    embedder = None
    model = args.embed or index.embed_model  # an index with vectors keeps getting them, from its model
    if model is not None:
        from lmforge.paths import resolve
        from lmforge.retrieval.embed import Embedder, embedder_for, model_id_of

        if args.embed:
            index.check_model(model_id_of(args.embed, resolve(args.embed)))  # before minutes of loading
        embedder = Embedder.load(args.embed) if args.embed else embedder_for(model)
        if embedder.kind == "decoder":
            print(f"note: {embedder.model_id} is a text-generation model; its vectors (the mean of its hidden states) "
                  "retrieve worse than an embedding model's: import one (a bge, e5 or MiniLM directory) and pass "
                  "it to --embed", file=sys.stderr)
    progress = embed_progress = None
    if args.progress or (args.progress is None and sys.stderr.isatty()):
        from tqdm import tqdm

        bar = tqdm(total=len(files), unit="doc", desc=f"indexing {args.name}")
        progress = lambda _path: bar.update(1)  # noqa: E731 - one line, called per document written
        if embedder is not None:
            ebar = tqdm(unit="chunk", desc=f"embedding with {embedder.model_id}")
            embed_progress = ebar.update
    stats = index.update(files, complete=not args.keep_missing, progress=progress, embedder=embedder,
                         embed_progress=embed_progress)
    print(f"indexed {len(files)} documents into {args.name} ({path}): {stats.added} added, {stats.changed} changed, "
          f"{stats.unchanged} unchanged, {stats.removed} removed; {stats.chunks_written} chunks written")
    if embedder is not None:
        print(f"{stats.embedded} chunks embedded with {embedder.model_id} ({embedder.dim} dimensions); "
              "search is hybrid (BM25 + vectors)")
        if stats.truncated:
            print(f"warning: {stats.truncated} of them longer than {embedder.model_id}'s context of "
                  f"{embedder.max_tokens} tokens were embedded from their beginning only (a smaller --max-chars "
                  "avoids it)", file=sys.stderr)
    if walk is not None and walk.skipped.count:
        print(f"skipped {walk.skipped.count} files: {', '.join(walk.skipped.examples)}"
              f"{', ...' if walk.skipped.count > len(walk.skipped.examples) else ''} (--strict stops at the first)",
              file=sys.stderr)
    return 0


def cmd_search(args) -> int:
    from lmforge.retrieval.index import open_index

    index = open_index(args.index)
    hits = index.search(args.query, k=args.k)
    if hits.truncated:
        print(f"warning: the query is longer than the context of {index.embed_model}; only its beginning was "
              "embedded (the whole query was used for BM25)", file=sys.stderr)
    if hits.mode == "hybrid":
        print(f"hybrid search (BM25 + vectors from {index.embed_model}, fused by reciprocal rank)")
    if not hits:
        print("no passage matches")
        return 0
    for h in hits:
        where = f"{h.path}:{h.start_line}-{h.end_line}" + (f"  ({h.heading})" if h.heading else "")
        print(f"[{h.rank}] {h.score:.3g}  {where}")
        text = h.text if len(h.text) <= args.chars else h.text[:args.chars].rstrip() + " ..."
        print("    " + text.replace("\n", "\n    "))
    return 0


def register(sub) -> list[argparse.ArgumentParser]:
    """Add `index` and `search` to `sub`; returns the parsers whose numeric flags get short metavars."""
    i = sub.add_parser("index", help="index your documents for search (SQLite full-text, BM25), incrementally",
                       formatter_class=Formatter,
                       description=para("Chunk documents along their structure (Markdown and reStructuredText "
                                         "headings, paragraphs, code blocks; one chunk per top-level function or class "
                                         "of a .py file) and store them in a full-text index, "
                                         "$LMFORGE_HOME/indexes/NAME.sqlite. Running it again re-chunks only files "
                                         "whose content changed and drops files no longer there, in one transaction: "
                                         "an interrupted run leaves the previous index searchable. Files taken from "
                                         "directories: .md .markdown .txt .rst .py (hidden ones, binary and non-UTF-8 "
                                         "files skipped, with a count); a file named directly is read whatever its "
                                         "suffix. builtin:pydocs indexes the Python documentation, one document per "
                                         "object."),
                       epilog="examples:\n  lmforge index ~/notes ~/project/docs --name mydocs\n"
                              "  lmforge index builtin:pydocs --name pydocs\n  lmforge search mydocs \"rotate the logs\"")
    i.add_argument("paths", nargs="+", metavar="PATH", help="files, directories, or builtin:pydocs")
    i.add_argument("--name", required=True, help="the index's name, as model names: a-z 0-9 . _ - (required)")
    i.add_argument("--max-chars", type=positive_int, default=1200, help="longest chunk in characters (default: 1200)")
    i.add_argument("--overlap", type=int, default=200, help="characters repeated between the pieces of a passage "
                   "too long for one chunk (default: 200)")
    i.add_argument("--strict", action="store_true", help="stop at the first unreadable, binary or non-UTF-8 file "
                   "instead of skipping it (default: skip and count)")
    i.add_argument("--keep-missing", action="store_true", help="keep documents indexed before that are not among "
                   "PATH this time (default: drop them, so the index mirrors PATH)")
    i.add_argument("--embed", metavar="MODEL", help="also store one vector per chunk from MODEL (a store name or "
                   "directory: an embedding model such as an imported bge/e5/MiniLM, or, weaker, any chat model), so "
                   "search is hybrid: BM25 and vector similarity fused. Only chunks without a vector are embedded. "
                   "An index keeps the model it was embedded with; another needs --rebuild (default: no vectors, "
                   "or the index's own model if it has some)")
    i.add_argument("--rebuild", action="store_true", help="start the index afresh (e.g. after it was damaged, or to "
                   "switch --embed model)")
    add_progress_flag(i)
    i.set_defaults(func=cmd_index)

    s = sub.add_parser("search", help="ranked passages of an index for a query", formatter_class=Formatter,
                       description=para("Search an index made by `lmforge index`: the passages that best match the "
                                         "query's words (BM25, with stemming), best first, with their file, line range "
                                         "and heading. Query words are matched as words: quotes and operators have no "
                                         "special meaning. An index built with --embed is searched hybrid: the BM25 "
                                         "ranking and the vector-similarity ranking fused by reciprocal rank (scores "
                                         "are then fusion scores, at most 0.033), with the model it was built with."))
    s.add_argument("index", help="the index's name (see `lmforge index`)")
    s.add_argument("query", help="what to look for")
    s.add_argument("-k", type=positive_int, default=5, help="passages to show (default: 5)")
    s.add_argument("--chars", type=positive_int, default=400, help="characters of each passage to print (default: 400)")
    s.set_defaults(func=cmd_search)
    return [i, s]
