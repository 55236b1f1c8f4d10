//! Readable tables of runs and audit events for the `apex` command.

use serde_json::Value;

/// Formats Unix milliseconds as `YYYY-MM-DD HH:MM:SS` UTC.
pub fn format_time_ms(ms: i64) -> String {
    format_time(ms.div_euclid(1000))
}

/// Formats Unix seconds as `YYYY-MM-DD HH:MM:SS` UTC.
pub fn format_time(seconds: i64) -> String {
    let days = seconds.div_euclid(86_400);
    let second_of_day = seconds.rem_euclid(86_400);

    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);

    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60
    )
}

/// Lays out rows under headers, each column as wide as its widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }

    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        padded.join("  ").trim_end().to_string() + "\n"
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

/// Formats a cell: one line, so a multi-line error cannot break the table.
fn text(value: &Value) -> String {
    let text = match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    text.replace(['\n', '\r'], " ")
}

/// Formats the body of `GET /v1/runs` as a table.
pub fn runs_table(body: &Value) -> String {
    let rows: Vec<Vec<String>> = body["runs"]
        .as_array()
        .map(|runs| {
            runs.iter()
                .map(|run| {
                    vec![
                        text(&run["run_id"]),
                        text(&run["plugin"]),
                        text(&run["status"]),
                        run["queued_at_ms"].as_i64().map_or("-".into(), format_time_ms),
                        run["duration_ms"]
                            .as_i64()
                            .map_or("-".into(), |ms| format!("{ms} ms")),
                        text(&run["error"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    let mut out = table(
        &["RUN", "PLUGIN", "STATUS", "QUEUED (UTC)", "DURATION", "ERROR"],
        &rows,
    );
    if let Some(next) = body["next_before"].as_str() {
        out.push_str(&format!("more: --before {next}\n"));
    }
    out
}

/// Formats the body of `GET /v1/audit` as a table.
pub fn audit_table(body: &Value) -> String {
    let rows: Vec<Vec<String>> = body["events"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .map(|event| {
                    let details = event["fields"]
                        .as_object()
                        .map(|fields| {
                            fields
                                .iter()
                                .map(|(k, v)| format!("{k}={}", text(v)))
                                .collect::<Vec<_>>()
                                .join(" ")
                        })
                        .unwrap_or_default();
                    vec![
                        event["time"].as_i64().map_or("-".into(), format_time),
                        text(&event["kind"]),
                        crate::truncate_text(&details, 160),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(&["TIME (UTC)", "KIND", "DETAILS"], &rows)
}

/// Formats one run (`GET /v1/runs/{id}`) for reading: status, then output.
pub fn run_logs(body: &Value) -> String {
    let mut out = format!(
        "run {} of {}: {}",
        text(&body["run_id"]),
        text(&body["plugin"]),
        text(&body["status"])
    );
    if let Some(ms) = body["duration_ms"].as_i64() {
        out.push_str(&format!(" in {ms} ms"));
    }
    out.push('\n');
    if let Some(error) = body["error"].as_str() {
        out.push_str(&format!("error: {error}\n"));
    }
    for (name, truncated) in [("stdout", "stdout_truncated"), ("stderr", "stderr_truncated")] {
        let stream = body[name].as_str().unwrap_or_default();
        if !stream.is_empty() {
            out.push_str(&format!(
                "--- {name}{}\n{stream}",
                if body[truncated] == true {
                    " (truncated)"
                } else {
                    ""
                }
            ));
            if !stream.ends_with('\n') {
                out.push('\n');
            }
        }
    }
    if let Some(decisions) = body["decisions"].as_array().filter(|d| !d.is_empty()) {
        out.push_str("--- decisions\n");
        for decision in decisions {
            let verdict = if decision["allowed"] == true {
                "allowed"
            } else {
                "DENIED"
            };
            out.push_str(&format!(
                "{verdict} {} {}: {}\n",
                text(&decision["capability"]),
                text(&decision["target"]),
                text(&decision["reason"])
            ));
        }
    }
    if !body["output"].is_null() {
        out.push_str(&format!(
            "--- output\n{}\n",
            serde_json::to_string_pretty(&body["output"]).unwrap_or_default()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_formats_as_utc() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00");
        assert_eq!(format_time(1_764_806_400), "2025-12-04 00:00:00");
        assert_eq!(format_time(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(format_time_ms(1_764_806_461_999), "2025-12-04 00:01:01");
    }

    #[test]
    fn cells_stay_on_one_line() {
        let body = serde_json::json!({ "runs": [{ "run_id": "r1", "error": "first\nsecond" }] });
        let out = runs_table(&body);
        assert_eq!(out.lines().count(), 2, "{out}");
        assert!(out.contains("first second"));
    }

    #[test]
    fn table_aligns_columns() {
        let out = table(&["A", "LONGER"], &[vec!["wide cell".into(), "x".into()]]);
        assert_eq!(out, "A          LONGER\nwide cell  x\n");
    }
}
