"""zstd:chunked (containers/storage's lazily pullable zstd layers): the TOC, footer and
chunk frame format (pure) and fetching the TOC; chunks are read by the eStargz lazy reader."""
