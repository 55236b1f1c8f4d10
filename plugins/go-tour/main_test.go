package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// decodeReport runs the tour on input and decodes its output into a map, so
// that a check can tell null from a missing key.
func decodeReport(t *testing.T, input string) map[string]any {
	t.Helper()
	output, err := runTour([]byte(input))
	if err != nil {
		t.Fatalf("runTour(%q) failed: %v", input, err)
	}
	var decoded map[string]any
	if err := json.Unmarshal(output, &decoded); err != nil {
		t.Fatalf("output %s is not a JSON object: %v", output, err)
	}
	return decoded
}

func TestEmptyInputGivesNulls(t *testing.T) {
	for _, input := range []string{"", "  \n", "null", "{}", `{"file": null, "url": null, "command": null}`} {
		report := decodeReport(t, input)
		if report["language"] != "go" {
			t.Errorf("input %q: language = %v, want go", input, report["language"])
		}
		for _, key := range []string{"file_bytes", "http_status", "command_stdout"} {
			value, ok := report[key]
			if !ok {
				t.Errorf("input %q: key %s missing", input, key)
			}
			if value != nil {
				t.Errorf("input %q: %s = %v, want null", input, key, value)
			}
		}
	}
}

func TestFileBytesCountsWholeFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "data.bin")
	content := strings.Repeat("x", 70000)
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	input, _ := json.Marshal(map[string]string{"file": path})

	report := decodeReport(t, string(input))
	// encoding/json decodes numbers into float64.
	if report["file_bytes"] != float64(len(content)) {
		t.Errorf("file_bytes = %v, want %d", report["file_bytes"], len(content))
	}
}

func TestMissingFileGivesErrorText(t *testing.T) {
	path := filepath.Join(t.TempDir(), "missing.txt")
	input, _ := json.Marshal(map[string]string{"file": path})

	report := decodeReport(t, string(input))
	text, ok := report["file_bytes"].(string)
	if !ok {
		t.Fatalf("file_bytes = %v, want an error text", report["file_bytes"])
	}
	if !strings.Contains(text, path) {
		t.Errorf("error text %q does not name the path", text)
	}
}

func TestURLAndCommandAreUnavailable(t *testing.T) {
	report := decodeReport(t, `{"url": "http://allowed.test/a.txt", "command": "echo hi"}`)
	if report["http_status"] != httpUnavailable {
		t.Errorf("http_status = %v, want %q", report["http_status"], httpUnavailable)
	}
	if report["command_stdout"] != shellUnavailable {
		t.Errorf("command_stdout = %v, want %q", report["command_stdout"], shellUnavailable)
	}
	if report["file_bytes"] != nil {
		t.Errorf("file_bytes = %v, want null", report["file_bytes"])
	}
}

func TestNonStringValueGivesErrorText(t *testing.T) {
	report := decodeReport(t, `{"file": 5, "command": ["echo"]}`)
	if report["file_bytes"] != "invalid file: expected a string, got 5" {
		t.Errorf("file_bytes = %v", report["file_bytes"])
	}
	if report["command_stdout"] != `invalid command: expected a string, got ["echo"]` {
		t.Errorf("command_stdout = %v", report["command_stdout"])
	}
}

func TestInvalidInputIsRejected(t *testing.T) {
	cases := map[string]string{
		`{"file": `: "unexpected end of JSON input",
		`[1, 2]`:    "got a JSON array",
		`"text"`:    "got a JSON string",
	}
	for input, want := range cases {
		_, err := runTour([]byte(input))
		if err == nil {
			t.Errorf("runTour(%q) succeeded, want an error", input)
			continue
		}
		if !strings.Contains(err.Error(), want) {
			t.Errorf("runTour(%q) error = %q, want it to contain %q", input, err, want)
		}
	}
}
