//! The smallest task plugin: greets the `name` given in its input.
//!
//! Input: `{"name": "Ada"}`. Output: `{"greeting": "Hello, Ada!"}`. Without a
//! name it greets the world.

wit_bindgen::generate!({
    path: "../../wit",
    world: "apex:task/task",
    generate_all,
});

#[derive(serde::Deserialize)]
struct Input {
    name: Option<String>,
}

struct Hello;

impl Guest for Hello {
    fn run(input: String) -> Result<String, String> {
        // A run without input passes `null`.
        let input: Option<Input> = serde_json::from_str(&input).map_err(|e| format!("invalid input: {e}"))?;
        let name = input.and_then(|i| i.name).unwrap_or_else(|| "world".to_string());

        let output = serde_json::json!({ "greeting": format!("Hello, {name}!") });
        Ok(output.to_string())
    }
}

export!(Hello);
