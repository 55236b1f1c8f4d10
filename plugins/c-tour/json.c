#include "json.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// Nesting limit for values under keys the tour does not use, so that deeply
// nested input cannot exhaust the stack.
#define MAX_DEPTH 128

typedef struct {
  const char *start;
  const char *pos;
  const char *end;
  char *error;
} parser_t;

static void *checked_malloc(size_t size) {
  void *memory = malloc(size);
  if (memory == NULL) abort();
  return memory;
}

static bool fail(parser_t *parser, const char *expected) {
  if (parser->error != NULL) return false;
  const char *format = "invalid input: expected %s at byte %zu of the JSON text";
  size_t offset = (size_t)(parser->pos - parser->start);
  int size = snprintf(NULL, 0, format, expected, offset);
  parser->error = checked_malloc((size_t)size + 1);
  snprintf(parser->error, (size_t)size + 1, format, expected, offset);
  return false;
}

static void skip_whitespace(parser_t *parser) {
  while (parser->pos < parser->end &&
         (*parser->pos == ' ' || *parser->pos == '\t' || *parser->pos == '\n' || *parser->pos == '\r')) {
    parser->pos++;
  }
}

static bool consume_literal(parser_t *parser, const char *literal) {
  size_t len = strlen(literal);
  if ((size_t)(parser->end - parser->pos) < len || memcmp(parser->pos, literal, len) != 0) return false;
  parser->pos += len;
  return true;
}

static int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Reads the four hex digits after `\u`.
static bool parse_hex4(parser_t *parser, uint32_t *value) {
  if (parser->end - parser->pos < 4) return fail(parser, "four hex digits");
  *value = 0;
  for (int i = 0; i < 4; i++) {
    int digit = hex_value(parser->pos[i]);
    if (digit < 0) return fail(parser, "four hex digits");
    *value = (*value << 4) | (uint32_t)digit;
  }
  parser->pos += 4;
  return true;
}

static size_t encode_utf8(uint32_t code_point, char *out) {
  if (code_point < 0x80) {
    out[0] = (char)code_point;
    return 1;
  }
  if (code_point < 0x800) {
    out[0] = (char)(0xC0 | (code_point >> 6));
    out[1] = (char)(0x80 | (code_point & 0x3F));
    return 2;
  }
  if (code_point < 0x10000) {
    out[0] = (char)(0xE0 | (code_point >> 12));
    out[1] = (char)(0x80 | ((code_point >> 6) & 0x3F));
    out[2] = (char)(0x80 | (code_point & 0x3F));
    return 3;
  }
  out[0] = (char)(0xF0 | (code_point >> 18));
  out[1] = (char)(0x80 | ((code_point >> 12) & 0x3F));
  out[2] = (char)(0x80 | ((code_point >> 6) & 0x3F));
  out[3] = (char)(0x80 | (code_point & 0x3F));
  return 4;
}

// Decodes the `\uXXXX` escape whose backslash is at `parser->pos`, joining a
// UTF-16 surrogate pair into one code point.
static bool parse_unicode_escape(parser_t *parser, uint32_t *code_point) {
  parser->pos += 2;
  if (!parse_hex4(parser, code_point)) return false;
  if (*code_point >= 0xDC00 && *code_point <= 0xDFFF) return fail(parser, "a high surrogate before a low one");
  if (*code_point < 0xD800 || *code_point > 0xDBFF) return true;

  uint32_t low = 0;
  if (!consume_literal(parser, "\\u") || !parse_hex4(parser, &low) || low < 0xDC00 || low > 0xDFFF) {
    return fail(parser, "a low surrogate escape after a high one");
  }
  *code_point = 0x10000 + ((*code_point - 0xD800) << 10) + (low - 0xDC00);
  return true;
}

// Parses a string literal at `parser->pos`. When `out` is NULL the string is
// only checked and skipped.
static bool parse_string(parser_t *parser, json_text_t *out) {
  if (parser->pos >= parser->end || *parser->pos != '"') return fail(parser, "a string");
  parser->pos++;

  // Escapes never decode to more bytes than they take in the input.
  const char *body = parser->pos;
  char *data = out != NULL ? checked_malloc((size_t)(parser->end - body) + 1) : NULL;
  size_t len = 0;
  char scratch[4];

  while (parser->pos < parser->end && *parser->pos != '"') {
    unsigned char c = (unsigned char)*parser->pos;
    if (c < 0x20) {
      free(data);
      return fail(parser, "an escaped control character");
    }
    if (c != '\\') {
      if (data != NULL) data[len++] = (char)c;
      parser->pos++;
      continue;
    }

    if (parser->end - parser->pos < 2) {
      free(data);
      parser->pos = parser->end;
      return fail(parser, "a closing quote");
    }
    char decoded;
    switch (parser->pos[1]) {
      case '"': decoded = '"'; break;
      case '\\': decoded = '\\'; break;
      case '/': decoded = '/'; break;
      case 'b': decoded = '\b'; break;
      case 'f': decoded = '\f'; break;
      case 'n': decoded = '\n'; break;
      case 'r': decoded = '\r'; break;
      case 't': decoded = '\t'; break;
      case 'u': {
        uint32_t code_point;
        if (!parse_unicode_escape(parser, &code_point)) {
          free(data);
          return false;
        }
        size_t size = encode_utf8(code_point, data != NULL ? data + len : scratch);
        len += size;
        continue;
      }
      default:
        free(data);
        parser->pos++;
        return fail(parser, "a valid escape character");
    }
    if (data != NULL) data[len++] = decoded;
    parser->pos += 2;
  }

  if (parser->pos >= parser->end) {
    free(data);
    return fail(parser, "a closing quote");
  }
  parser->pos++;
  if (out != NULL) {
    data[len] = '\0';
    out->data = data;
    out->len = len;
  }
  return true;
}

static bool skip_digits(parser_t *parser) {
  const char *first = parser->pos;
  while (parser->pos < parser->end && *parser->pos >= '0' && *parser->pos <= '9') parser->pos++;
  return parser->pos > first;
}

static bool skip_number(parser_t *parser) {
  if (parser->pos < parser->end && *parser->pos == '-') parser->pos++;
  if (parser->pos < parser->end && *parser->pos == '0') {
    parser->pos++;
  } else if (!skip_digits(parser)) {
    return fail(parser, "a value");
  }
  if (parser->pos < parser->end && *parser->pos == '.') {
    parser->pos++;
    if (!skip_digits(parser)) return fail(parser, "digits after the decimal point");
  }
  if (parser->pos < parser->end && (*parser->pos == 'e' || *parser->pos == 'E')) {
    parser->pos++;
    if (parser->pos < parser->end && (*parser->pos == '+' || *parser->pos == '-')) parser->pos++;
    if (!skip_digits(parser)) return fail(parser, "exponent digits");
  }
  return true;
}

static bool skip_value(parser_t *parser, int depth);

// Skips the elements of an array or the members of an object, whose opening
// bracket has been consumed.
static bool skip_container(parser_t *parser, int depth, bool is_object) {
  char close = is_object ? '}' : ']';
  skip_whitespace(parser);
  if (parser->pos < parser->end && *parser->pos == close) {
    parser->pos++;
    return true;
  }
  for (;;) {
    if (is_object) {
      if (!parse_string(parser, NULL)) return false;
      skip_whitespace(parser);
      if (parser->pos >= parser->end || *parser->pos != ':') return fail(parser, "':'");
      parser->pos++;
    }
    if (!skip_value(parser, depth + 1)) return false;
    skip_whitespace(parser);
    if (parser->pos < parser->end && *parser->pos == ',') {
      parser->pos++;
      skip_whitespace(parser);
      continue;
    }
    if (parser->pos < parser->end && *parser->pos == close) {
      parser->pos++;
      return true;
    }
    return fail(parser, is_object ? "',' or '}'" : "',' or ']'");
  }
}

static bool skip_value(parser_t *parser, int depth) {
  if (depth > MAX_DEPTH) return fail(parser, "less nesting");
  skip_whitespace(parser);
  if (parser->pos >= parser->end) return fail(parser, "a value");
  switch (*parser->pos) {
    case '"':
      return parse_string(parser, NULL);
    case '{':
    case '[': {
      bool is_object = *parser->pos == '{';
      parser->pos++;
      return skip_container(parser, depth, is_object);
    }
    case 't':
      return consume_literal(parser, "true") || fail(parser, "a value");
    case 'f':
      return consume_literal(parser, "false") || fail(parser, "a value");
    case 'n':
      return consume_literal(parser, "null") || fail(parser, "a value");
    default:
      return skip_number(parser);
  }
}

static void text_free(json_text_t **text) {
  if (*text == NULL) return;
  free((*text)->data);
  free(*text);
  *text = NULL;
}

// Parses the value of a tour key: a string, or null for "absent". A repeated
// key replaces the earlier value, as in most JSON libraries.
static bool parse_optional_string(parser_t *parser, json_text_t **slot) {
  skip_whitespace(parser);
  text_free(slot);
  if (consume_literal(parser, "null")) return true;

  json_text_t text;
  if (!parse_string(parser, &text)) return false;
  *slot = checked_malloc(sizeof **slot);
  **slot = text;
  return true;
}

static bool parse_members(parser_t *parser, tour_input_t *input) {
  skip_whitespace(parser);
  if (parser->pos < parser->end && *parser->pos == '}') {
    parser->pos++;
    return true;
  }
  for (;;) {
    json_text_t key;
    if (!parse_string(parser, &key)) return false;
    skip_whitespace(parser);
    if (parser->pos >= parser->end || *parser->pos != ':') {
      free(key.data);
      return fail(parser, "':'");
    }
    parser->pos++;

    json_text_t **slot = NULL;
    if (strcmp(key.data, "file") == 0 && key.len == 4) slot = &input->file;
    if (strcmp(key.data, "url") == 0 && key.len == 3) slot = &input->url;
    if (strcmp(key.data, "command") == 0 && key.len == 7) slot = &input->command;
    free(key.data);

    bool parsed = slot != NULL ? parse_optional_string(parser, slot) : skip_value(parser, 1);
    if (!parsed) return false;

    skip_whitespace(parser);
    if (parser->pos < parser->end && *parser->pos == ',') {
      parser->pos++;
      skip_whitespace(parser);
      continue;
    }
    if (parser->pos < parser->end && *parser->pos == '}') {
      parser->pos++;
      return true;
    }
    return fail(parser, "',' or '}'");
  }
}

char *tour_input_parse(const char *text, size_t len, tour_input_t *input) {
  parser_t parser = {text, text, text + len, NULL};
  *input = (tour_input_t){NULL, NULL, NULL};

  skip_whitespace(&parser);
  bool parsed;
  if (consume_literal(&parser, "null")) {
    parsed = true;
  } else if (parser.pos < parser.end && *parser.pos == '{') {
    parser.pos++;
    parsed = parse_members(&parser, input);
  } else {
    parsed = fail(&parser, "an object or null");
  }
  if (parsed) {
    skip_whitespace(&parser);
    if (parser.pos != parser.end) fail(&parser, "the end of the input");
  }

  if (parser.error != NULL) tour_input_free(input);
  return parser.error;
}

void tour_input_free(tour_input_t *input) {
  text_free(&input->file);
  text_free(&input->url);
  text_free(&input->command);
}

static void reserve(json_buffer_t *out, size_t extra) {
  if (out->cap - out->len >= extra) return;
  size_t cap = out->cap > 0 ? out->cap : 64;
  while (cap - out->len < extra) cap *= 2;
  char *data = realloc(out->data, cap);
  if (data == NULL) abort();
  out->data = data;
  out->cap = cap;
}

static void append_bytes(json_buffer_t *out, const char *bytes, size_t len) {
  reserve(out, len);
  memcpy(out->data + out->len, bytes, len);
  out->len += len;
}

void json_append(json_buffer_t *out, const char *text) {
  append_bytes(out, text, strlen(text));
}

void json_append_u64(json_buffer_t *out, unsigned long long value) {
  char digits[24];
  int len = snprintf(digits, sizeof digits, "%llu", value);
  append_bytes(out, digits, (size_t)len);
}

// Returns the length of the valid UTF-8 sequence at `bytes`, or 0 when it is
// invalid. Then `*invalid_len` is the length of the maximal prefix of a valid
// sequence (at least 1), which is replaced by one U+FFFD.
static size_t utf8_sequence_len(const unsigned char *bytes, size_t available, size_t *invalid_len) {
  unsigned char lead = bytes[0];
  size_t len;
  unsigned char low = 0x80;
  unsigned char high = 0xBF;

  if (lead < 0x80) return 1;
  if (lead >= 0xC2 && lead <= 0xDF) {
    len = 2;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    len = 3;
    if (lead == 0xE0) low = 0xA0;   // overlong
    if (lead == 0xED) high = 0x9F;  // UTF-16 surrogates
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    len = 4;
    if (lead == 0xF0) low = 0x90;   // overlong
    if (lead == 0xF4) high = 0x8F;  // above U+10FFFF
  } else {
    *invalid_len = 1;
    return 0;
  }

  for (size_t i = 1; i < len; i++) {
    bool valid = i < available && bytes[i] >= low && bytes[i] <= high;
    if (!valid) {
      *invalid_len = i;
      return 0;
    }
    low = 0x80;
    high = 0xBF;
  }
  return len;
}

void json_append_string(json_buffer_t *out, const char *bytes, size_t len) {
  static const char hex_digits[] = "0123456789abcdef";
  const unsigned char *input = (const unsigned char *)bytes;

  append_bytes(out, "\"", 1);
  size_t i = 0;
  while (i < len) {
    unsigned char c = input[i];
    if (c == '"' || c == '\\') {
      char escaped[2] = {'\\', (char)c};
      append_bytes(out, escaped, 2);
      i++;
    } else if (c < 0x20) {
      char escaped[6] = {'\\', 'u', '0', '0', hex_digits[c >> 4], hex_digits[c & 0xF]};
      switch (c) {
        case '\n': append_bytes(out, "\\n", 2); break;
        case '\r': append_bytes(out, "\\r", 2); break;
        case '\t': append_bytes(out, "\\t", 2); break;
        default: append_bytes(out, escaped, 6); break;
      }
      i++;
    } else {
      size_t invalid_len = 0;
      size_t sequence_len = utf8_sequence_len(input + i, len - i, &invalid_len);
      if (sequence_len > 0) {
        append_bytes(out, bytes + i, sequence_len);
        i += sequence_len;
      } else {
        append_bytes(out, "\xEF\xBF\xBD", 3);
        i += invalid_len;
      }
    }
  }
  append_bytes(out, "\"", 1);
}
