// estargz-verify: the upstream eStargz reader (github.com/containerd/stargz-snapshotter/estargz,
// as Debian packages it) as a test oracle. It opens a blob, checks its TOC against the digest
// given (the layer's toc.digest annotation), checks every chunk of every regular file against
// its chunkDigest, and prints one line per entry: "type mode size name".
//
// Usage: estargz-verify BLOB TOC-DIGEST
package main

import (
	"fmt"
	"io"
	"os"
	"sort"

	"github.com/containerd/stargz-snapshotter/estargz"
	digest "github.com/opencontainers/go-digest"
)

func main() {
	if err := run(os.Args[1], digest.Digest(os.Args[2])); err != nil {
		fmt.Fprintln(os.Stderr, "estargz-verify:", err)
		os.Exit(1)
	}
}

func run(path string, tocDigest digest.Digest) error {
	file, err := os.Open(path)
	if err != nil {
		return err
	}
	defer file.Close()
	info, err := file.Stat()
	if err != nil {
		return err
	}
	reader, err := estargz.Open(io.NewSectionReader(file, 0, info.Size()))
	if err != nil {
		return fmt.Errorf("open: %w", err)
	}
	verifier, err := reader.VerifyTOC(tocDigest)
	if err != nil {
		return fmt.Errorf("verify TOC: %w", err)
	}
	root, ok := reader.Lookup("")
	if !ok {
		return fmt.Errorf("no root entry")
	}
	var lines []string
	if err := walk(reader, verifier, root, "", &lines); err != nil {
		return err
	}
	sort.Strings(lines)
	for _, line := range lines {
		fmt.Println(line)
	}
	return nil
}

// walk lists the entries below dir by the path it reaches them at: a hardlink is listed under
// its own name with its target's attributes, as the reader resolves it.
func walk(reader *estargz.Reader, verifier estargz.TOCEntryVerifier, dir *estargz.TOCEntry, prefix string, lines *[]string) error {
	var failure error
	dir.ForeachChild(func(name string, entry *estargz.TOCEntry) bool {
		path := prefix + name
		*lines = append(*lines, fmt.Sprintf("%s %o %d %s", entry.Type, entry.Stat().Mode().Perm(), entry.Size, path))
		if entry.Type == "reg" && entry.Size > 0 {
			failure = verifyChunks(reader, verifier, entry)
		} else if entry.Type == "dir" {
			failure = walk(reader, verifier, entry, path+"/", lines)
		}
		return failure == nil
	})
	return failure
}

func verifyChunks(reader *estargz.Reader, verifier estargz.TOCEntryVerifier, entry *estargz.TOCEntry) error {
	content, err := reader.OpenFile(entry.Name)
	if err != nil {
		return fmt.Errorf("%s: %w", entry.Name, err)
	}
	for offset := int64(0); offset < entry.Size; {
		chunk, ok := reader.ChunkEntryForOffset(entry.Name, offset)
		if !ok {
			return fmt.Errorf("%s: no chunk at offset %d", entry.Name, offset)
		}
		check, err := verifier.Verifier(chunk)
		if err != nil {
			return fmt.Errorf("%s: %w", entry.Name, err)
		}
		if _, err := io.Copy(check, io.NewSectionReader(content, chunk.ChunkOffset, chunk.ChunkSize)); err != nil {
			return fmt.Errorf("%s: %w", entry.Name, err)
		}
		if !check.Verified() {
			return fmt.Errorf("%s: chunk at %d fails its chunkDigest", entry.Name, chunk.ChunkOffset)
		}
		offset = chunk.ChunkOffset + chunk.ChunkSize
	}
	return nil
}
