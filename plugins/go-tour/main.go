// Command go-tour is the Go example of the tour contract, built as a WASI
// preview 1 command module (GOOS=wasip1 GOARCH=wasm).
//
// It reads JSON {"file": PATH, "url": URL, "command": CMD} from standard
// input, where every key is optional, and prints one JSON line to standard
// output:
//
//	{"language": "go", "file_bytes": N, "http_status": "unavailable: ...", "command_stdout": "unavailable: ..."}
//
// A key that is absent or null gives null. file_bytes is the size of the
// file at PATH, read through the preopened directories, or the error
// text when the read fails. Preview 1 has no HTTP client interface, and a
// preview 1 module imports only wasi_snapshot_preview1, so it cannot reach
// the host's apex:task/shell interface either. A given url or command
// therefore gets an "unavailable" text in place of a value. The exit status
// is 0 whenever the input is a JSON object, empty or null, even when steps
// fail, and 2 when it is not.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"syscall"
)

const (
	httpUnavailable  = "unavailable: WASI preview 1 has no HTTP interface, so this module cannot send the GET request"
	shellUnavailable = "unavailable: a WASI preview 1 module imports only wasi_snapshot_preview1, so it cannot call the host's apex:task/shell interface"
)

// report is the output line. Each field is nil (JSON null) when its key is
// absent from the input, and a string when the step failed or is unavailable.
type report struct {
	Language      string `json:"language"`
	FileBytes     any    `json:"file_bytes"`
	HTTPStatus    any    `json:"http_status"`
	CommandStdout any    `json:"command_stdout"`
}

func main() {
	input, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintf(os.Stderr, "go-tour: failed to read standard input: %v\n", err)
		os.Exit(2)
	}

	output, err := runTour(input)
	if err != nil {
		fmt.Fprintf(os.Stderr, "go-tour: %v\n", err)
		os.Exit(2)
	}

	os.Stdout.Write(append(output, '\n'))
}

// runTour parses the input object, runs the step for each key present and
// returns the report as JSON. It returns an error only when the input is not
// a JSON object. A step that fails puts its error text in the report.
func runTour(input []byte) ([]byte, error) {
	fields := map[string]json.RawMessage{}
	// Empty input and `null` mean a run without input, so every value is null.
	trimmed := bytes.TrimSpace(input)
	if len(trimmed) > 0 && !bytes.Equal(trimmed, []byte("null")) {
		if err := json.Unmarshal(trimmed, &fields); err != nil {
			var typeErr *json.UnmarshalTypeError
			if errors.As(err, &typeErr) {
				return nil, fmt.Errorf("invalid input: expected a JSON object with optional keys file, url and command, got a JSON %s", typeErr.Value)
			}
			return nil, fmt.Errorf("invalid input: expected a JSON object with optional keys file, url and command: %v", err)
		}
	}

	out := report{Language: "go"}

	if path, present, err := stringField(fields, "file"); err != nil {
		out.FileBytes = err.Error()
	} else if present {
		out.FileBytes = fileSize(path)
	}

	if _, present, err := stringField(fields, "url"); err != nil {
		out.HTTPStatus = err.Error()
	} else if present {
		out.HTTPStatus = httpUnavailable
	}

	if _, present, err := stringField(fields, "command"); err != nil {
		out.CommandStdout = err.Error()
	} else if present {
		out.CommandStdout = shellUnavailable
	}

	return json.Marshal(out)
}

// stringField returns the string value of key. present is false when the key
// is absent or null, and err is set when the value is not a string.
func stringField(fields map[string]json.RawMessage, key string) (value string, present bool, err error) {
	raw, ok := fields[key]
	if !ok || bytes.Equal(raw, []byte("null")) {
		return "", false, nil
	}
	if err := json.Unmarshal(raw, &value); err != nil {
		return "", true, fmt.Errorf("invalid %s: expected a string, got %s", key, raw)
	}
	return value, true, nil
}

// fileSize returns the length in bytes of the file at path, or the error
// text. Under wasip1 the Go runtime resolves an absolute path against the
// preopened directories, so path must lie inside one of them.
//
// It counts the bytes through a small buffer rather than reading the file
// whole. Under the preview 1 adapter, memory that Go's heap takes after
// start-up can overlap the adapter's state (see docs/plugins/go.md), so the
// tour keeps its heap at its initial size.
func fileSize(path string) any {
	file, err := os.Open(path)
	if err != nil {
		return describeReadError(path, err)
	}
	defer file.Close()
	n, err := io.Copy(io.Discard, file)
	if err != nil {
		return describeReadError(path, err)
	}
	return n
}

// describeReadError returns the error text, naming the cause of the two
// failures that WASI preview 1 reports only as EBADF ("Bad file number").
func describeReadError(path string, err error) string {
	var pathErr *fs.PathError
	if !errors.As(err, &pathErr) || !errors.Is(err, syscall.EBADF) {
		return err.Error()
	}

	switch pathErr.Op {
	case "open":
		// The Go runtime passes descriptor -1 to path_open when no
		// preopened directory name is a prefix of the cleaned path
		// (preparePath in syscall/fs_wasip1.go, Go 1.23.9 and 1.27.3).
		return err.Error() + " (the path is not inside a preopened directory)"
	case "read":
		// fd_read on a directory fails with EBADF, not EISDIR (seen with
		// wasmtime 51 and with the preview 1 adapter of wasmtime 48.0.8).
		if info, statErr := os.Stat(path); statErr == nil && info.IsDir() {
			return err.Error() + " (the path is a directory)"
		}
	}
	return err.Error()
}
