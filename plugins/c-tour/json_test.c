// Tests of json.c, built for the host:
//   cc -std=c11 -Wall -Wextra -fsanitize=address,undefined -o json_test json_test.c json.c && ./json_test

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"

static int passed;
static int failed;

static void check(bool condition, const char *name, const char *detail) {
  if (condition) {
    passed++;
  } else {
    failed++;
    printf("FAIL %s: %s\n", name, detail);
  }
}

static bool text_equals(const json_text_t *text, const char *expected, size_t expected_len) {
  return text != NULL && text->len == expected_len && memcmp(text->data, expected, expected_len) == 0;
}

static void test_parse_ok(void) {
  tour_input_t input;
  const char *json = " {\"file\": \"/a/b.txt\", \"other\": [1, -2.5e3, {\"x\": [true, false, null]}],"
                     " \"url\": null, \"command\": \"echo \\\"hi\\\" \\u00e9\\ud83d\\ude00\\n\"} ";
  char *error = tour_input_parse(json, strlen(json), &input);
  check(error == NULL, "parse object", error != NULL ? error : "");
  check(text_equals(input.file, "/a/b.txt", 8), "parse file", "wrong file value");
  check(input.url == NULL, "parse null url", "null should mean absent");
  const char *command = "echo \"hi\" \xC3\xA9\xF0\x9F\x98\x80\n";
  check(text_equals(input.command, command, strlen(command)), "parse escapes", "wrong command value");
  tour_input_free(&input);
  free(error);
}

static void test_parse_null_and_empty(void) {
  const char *cases[] = {"null", "{}", " { } "};
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    tour_input_t input;
    char *error = tour_input_parse(cases[i], strlen(cases[i]), &input);
    check(error == NULL, "parse empty input", cases[i]);
    check(input.file == NULL && input.url == NULL && input.command == NULL, "empty input has no keys", cases[i]);
    tour_input_free(&input);
    free(error);
  }
}

static void test_parse_embedded_nul_and_repeat(void) {
  tour_input_t input;
  const char *json = "{\"file\": \"x\", \"file\": \"a\\u0000b\"}";
  char *error = tour_input_parse(json, strlen(json), &input);
  check(error == NULL, "parse repeated key", error != NULL ? error : "");
  check(text_equals(input.file, "a\0b", 3), "repeated key keeps last value", "wrong file value");
  tour_input_free(&input);
  free(error);
}

static void test_parse_errors(void) {
  const char *cases[] = {
      "",
      "[1]",
      "{\"file\": 5}",
      "{\"file\": \"a\"",
      "{\"file\": \"a\"} x",
      "{\"file\": \"\\ud800\"}",
      "{\"file\": \"\\udc00\"}",
      "{\"file\": \"\\x\"}",
      "{\"file\": \"a\\",
      "{\"file\": \"tab\there\"}",
      "{\"other\": 01}",
      "{\"other\": [1,]}",
      "{\"other\": tru}",
      "{\"file\" \"a\"}",
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    tour_input_t input;
    char *error = tour_input_parse(cases[i], strlen(cases[i]), &input);
    check(error != NULL, "parse rejects invalid input", cases[i]);
    check(input.file == NULL && input.url == NULL && input.command == NULL, "rejected input leaves no keys",
          cases[i]);
    free(error);
  }

  char deep[400];
  memset(deep, '[', sizeof deep);
  memcpy(deep, "{\"x\": ", 6);
  tour_input_t input;
  char *error = tour_input_parse(deep, sizeof deep, &input);
  check(error != NULL && strstr(error, "less nesting") != NULL, "parse limits nesting", error != NULL ? error : "");
  free(error);
}

static void check_escaped(const char *bytes, size_t len, const char *expected) {
  json_buffer_t out = {0};
  json_append_string(&out, bytes, len);
  bool equal = out.len == strlen(expected) && memcmp(out.data, expected, out.len) == 0;
  check(equal, "append string", expected);
  free(out.data);
}

static void test_append_string(void) {
  check_escaped("plain", 5, "\"plain\"");
  check_escaped("q\"b\\", 4, "\"q\\\"b\\\\\"");
  check_escaped("\n\r\t\x01\x1f", 5, "\"\\n\\r\\t\\u0001\\u001f\"");
  check_escaped("a\0b", 3, "\"a\\u0000b\"");
  check_escaped("\xC3\xA9\xF0\x9F\x98\x80", 6, "\"\xC3\xA9\xF0\x9F\x98\x80\"");
  // Invalid UTF-8: a lone byte, a truncated sequence, a surrogate, an
  // overlong encoding and a code point above U+10FFFF.
  check_escaped("\xFF", 1, "\"\xEF\xBF\xBD\"");
  check_escaped("\xE2\x82", 2, "\"\xEF\xBF\xBD\"");
  check_escaped("\xE2\x82x", 3, "\"\xEF\xBF\xBDx\"");
  check_escaped("\xED\xA0\x80", 3, "\"\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\"");
  check_escaped("\xC0\xAF", 2, "\"\xEF\xBF\xBD\xEF\xBF\xBD\"");
  check_escaped("\xF4\x90\x80\x80", 4, "\"\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\"");
}

static void test_append_grows(void) {
  json_buffer_t out = {0};
  for (int i = 0; i < 1000; i++) json_append(&out, "0123456789");
  json_append_u64(&out, 18446744073709551615ULL);
  check(out.len == 10020, "append grows buffer", "wrong length");
  check(memcmp(out.data + 10000, "18446744073709551615", 20) == 0, "append u64", "wrong digits");
  free(out.data);
}

int main(void) {
  test_parse_ok();
  test_parse_null_and_empty();
  test_parse_embedded_nul_and_repeat();
  test_parse_errors();
  test_append_string();
  test_append_grows();
  printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
