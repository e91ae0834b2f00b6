//! Registered functions called in another build of the program: the
//! example `other_build`, built plain and with a variant feature (other
//! offsets, one changed signature) by `scripts/test.sh`; one build is the
//! controller, the other the agent, reached through the shell bootstrap.

use std::path::PathBuf;

fn builds() -> Result<(PathBuf, PathBuf), String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/other-builds");
    let (plain, variant) = (dir.join("plain"), dir.join("variant"));
    if plain.is_file() && variant.is_file() {
        Ok((plain, variant))
    } else {
        Err(format!(
            "the two builds of examples/other_build.rs are not in {} (scripts/test.sh builds them)",
            dir.display()
        ))
    }
}

fn run(controller: &PathBuf, agent: &PathBuf) -> String {
    let output = std::process::Command::new(controller)
        .arg(agent)
        .output()
        .expect("run the controller build");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn line<'a>(output: &'a str, name: &str) -> &'a str {
    output
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("no {name} line in {output}"))
}

#[test]
fn registered_functions_run_in_another_build_and_nothing_else_does() {
    let Some((plain, variant)) = chopsticks_testkit::require(builds(), "other_build") else {
        return;
    };
    for (controller, agent, name) in [(&plain, &variant, "plain"), (&variant, &plain, "variant")] {
        let output = run(controller, agent);
        assert_eq!(line(&output, "controller"), name);
        assert_eq!(line(&output, "add"), "Ok(42)", "{output}");
        assert_eq!(line(&output, "shout"), "Ok(\"QUIET\")", "{output}");
        // Other types in the two builds: refused by the agent, naming the
        // function and both signatures.
        let width = line(&output, "width");
        assert!(
            width.starts_with("Err(")
                && width.contains("other_build::width")
                && width.contains("caller's build"),
            "{output}"
        );
        assert!(width.contains("on other"), "names the host: {output}");
        // Not registered: refused before anything is sent.
        let unlisted = line(&output, "build_name");
        assert!(
            unlisted.contains("another build") && unlisted.contains("other_build::build_name"),
            "{output}"
        );
    }
}
