/* jsonschema: structured outputs. Compiles a JSON schema to a grammar (grammar.h) whose
 * sentences are exactly JSON texts that validate against it (within the subset below), so that
 * constrained decoding always produces output that parses and validates.
 *
 * The subset is the one OpenAI documents for structured outputs: type (string, number,
 * integer, boolean, null, object, array, or a list of them), properties, required,
 * additionalProperties (false, true or a schema), items, minItems, maxItems, enum, const,
 * anyOf, $ref to "#", "#/$defs/..." or "#/definitions/..." (recursion included), string
 * minLength, maxLength and format (date, time, date-time, uuid), and minimum 0 / 1 on integers
 * and minimum 0 on numbers; annotations (title, description, default, examples, $schema, $id,
 * $comment, deprecated, readOnly, writeOnly) are ignored. Anything else is refused with an error
 * naming the keyword and where it is, never silently ignored: output that does not validate is
 * worse than a 400.
 *
 * What the grammar generates: properties in the schema's order, required ones always, optional
 * ones possibly; no properties beyond those listed (valid under any additionalProperties);
 * numbers of at most 16 integer digits, 16 fraction digits and 3 exponent digits; whitespace
 * limited to one space, or one newline with up to 20 spaces of indentation, between tokens (so a
 * model cannot loop on whitespace). */
#ifndef PCACHE_JSONSCHEMA_H
#define PCACHE_JSONSCHEMA_H
#include <stddef.h>
#include <cjson/cJSON.h>
#include "grammar.h"

/* The grammar of JSON texts valid under schema; NULL with err (unsupported keyword, bad
 * schema, unsatisfiable `false` schema, too deep). */
grammar *jsonschema_compile(const cJSON *schema, char *err, size_t errlen);
/* Compiles schema into a grammar being built (b, shared with other rules: tool calls embed one
 * schema per tool) and returns the rule matching exactly the JSON values valid under it, with no
 * whitespace around them; schema NULL: any JSON object. -1 with err when the schema is refused
 * (b then holds unfinished rules: the caller frees it). Each call makes its own building blocks
 * (whitespace, strings, numbers) in b. */
int jsonschema_compile_into(gbuild *b, const cJSON *schema, char *err, size_t errlen);
/* The grammar of any JSON object (response_format json_object). */
grammar *jsonschema_any_object(char *err, size_t errlen);

/* Compiled grammars shared by requests, keyed by the schema's text (a request names its
 * schema by value, so equal texts are one grammar and its mask cache is reused). LRU of cap
 * entries; thread-safe. */
typedef struct schema_cache schema_cache;
schema_cache *schema_cache_new(int cap);
void schema_cache_free(schema_cache *c);
/* A new reference to the grammar of schema_text (NULL: any JSON object), compiled on a miss.
 * NULL with err when the schema is refused. */
grammar *schema_cache_get(schema_cache *c, const char *schema_text, char *err, size_t errlen);
#endif
