//! The command line every bench takes (after `cargo bench ... --`).
//!
//! `--bench` (passed by `cargo bench`) and `--quick` choose the [`Mode`]; `--only a,b,c` picks
//! parts of the report ([`Only`]); each bench names its other options, which take one value: a
//! number or a comma-separated list. Anything else is reported and ignored.

use crate::BenchResult;
use serde::Serialize;
use std::fmt::Display;
use std::str::FromStr;

/// How much a bench does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// `cargo bench`: the full figures.
    Full,
    /// `--quick`: shorter points, the slowest parts left out.
    Quick,
    /// Not run by `cargo bench` (no `--bench`, as `cargo test --benches` runs it): a self-check
    /// only, which writes no JSON.
    Smoke,
}

/// The parts of a report `--only` selected: every part when it was not given.
#[derive(Debug, Clone, Default)]
pub struct Only(Option<Vec<String>>);

impl Only {
    /// Whether `part` is to run.
    pub fn wants(&self, part: &str) -> bool {
        self.0
            .as_ref()
            .is_none_or(|only| only.iter().any(|p| p == part))
    }

    /// Whether `--only` was given.
    pub fn is_given(&self) -> bool {
        self.0.is_some()
    }
}

/// The arguments of one run, read once; options are looked up by name afterwards.
#[derive(Debug, Clone)]
pub struct Args {
    bench: bool,
    quick: bool,
    /// Each option given, in order, with its value (`None` when the command line ended first).
    given: Vec<(String, Option<String>)>,
}

impl Args {
    /// Reads the process arguments. `options` are the names (`--appenders`) that take a value
    /// besides `--only`; other unknown arguments are reported on stderr as `<bench> bench:
    /// ignoring argument "..."`.
    pub fn from_env(bench: &str, options: &[&str]) -> Args {
        Args::parse(bench, options, std::env::args().skip(1))
    }

    /// [`Args::from_env`] over the given arguments (without the program name).
    pub fn parse(bench: &str, options: &[&str], args: impl IntoIterator<Item = String>) -> Args {
        let mut out = Args {
            bench: false,
            quick: false,
            given: Vec::new(),
        };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--bench" => out.bench = true,
                "--quick" => out.quick = true,
                name if name == "--only" || options.contains(&name) => {
                    out.given.push((arg, args.next()));
                }
                other => eprintln!("{bench} bench: ignoring argument {other:?}"),
            }
        }
        out
    }

    /// `--quick` wins; then `--bench` (cargo bench); neither: a smoke run.
    pub fn mode(&self) -> Mode {
        match (self.bench, self.quick) {
            (_, true) => Mode::Quick,
            (true, false) => Mode::Full,
            (false, false) => Mode::Smoke,
        }
    }

    /// `--only a,b,c`; `needs` completes the error "--only needs ..." when the value is missing.
    pub fn only(&self, needs: &str) -> BenchResult<Only> {
        let parts = self.value("--only", needs, |v| {
            Ok(v.split(',').map(str::to_string).collect())
        })?;
        Ok(Only(parts))
    }

    /// A number option: `--window 100`.
    pub fn number<T>(&self, name: &str, needs: &str) -> BenchResult<Option<T>>
    where
        T: FromStr,
        T::Err: Display,
    {
        self.value(name, needs, |v| {
            v.parse().map_err(|e| format!("{name} {v}: {e}"))
        })
    }

    /// A comma-separated list of numbers: `--appenders 1,8,64`.
    pub fn list<T>(&self, name: &str, needs: &str) -> BenchResult<Option<Vec<T>>>
    where
        T: FromStr,
        T::Err: Display,
    {
        self.value(name, needs, |v| {
            v.split(',')
                .map(|n| n.trim().parse::<T>())
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{name} {v}: {e}"))
        })
    }

    /// An option's value read by `read`; the last one given counts, but each is read, so a bad
    /// earlier one is still an error. `None` when the option was not given.
    pub fn value<T>(
        &self,
        name: &str,
        needs: &str,
        read: impl Fn(&str) -> Result<T, String>,
    ) -> BenchResult<Option<T>> {
        let mut out = None;
        for (_, v) in self.given.iter().filter(|(n, _)| n == name) {
            let v = v
                .as_deref()
                .ok_or_else(|| format!("{name} needs {needs}"))?;
            out = Some(read(v)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Args {
        Args::parse(
            "test",
            &["--n", "--ns"],
            line.split_whitespace().map(String::from),
        )
    }

    fn err<T: std::fmt::Debug>(r: BenchResult<T>) -> String {
        r.err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn mode_follows_the_flags() {
        assert_eq!(args("").mode(), Mode::Smoke);
        assert_eq!(args("--bench").mode(), Mode::Full);
        assert_eq!(args("--bench --quick").mode(), Mode::Quick);
        assert_eq!(args("--quick").mode(), Mode::Quick);
    }

    #[test]
    fn options_are_read_by_name() {
        let a = args("--bench --ns 1,8 --n 7 --only raw,store --n 9");
        assert_eq!(a.mode(), Mode::Full);
        assert_eq!(
            a.list::<usize>("--ns", "e.g. 1,8").ok(),
            Some(Some(vec![1, 8]))
        );
        let spaced = Args::parse("test", &["--ns"], ["--ns".into(), "1, 8 ,64".into()]);
        assert_eq!(
            spaced.list::<usize>("--ns", "x").ok(),
            Some(Some(vec![1, 8, 64]))
        );
        assert_eq!(a.number::<u64>("--n", "a number").ok(), Some(Some(9)));
        assert_eq!(a.list::<usize>("--other", "x").ok(), Some(None));
        let only = a.only("raw,store").unwrap_or_default();
        assert!(only.is_given() && only.wants("raw") && !only.wants("sled"));
        assert!(args("")
            .only("x")
            .is_ok_and(|o| !o.is_given() && o.wants("sled")));
    }

    #[test]
    fn errors_name_the_option() {
        assert_eq!(
            err(args("--ns").list::<usize>("--ns", "e.g. 1,8")),
            "--ns needs e.g. 1,8"
        );
        assert_eq!(
            err(args("--ns 1,x").list::<usize>("--ns", "e.g. 1,8")),
            "--ns 1,x: invalid digit found in string"
        );
        assert_eq!(
            err(args("--only").only("raw,sled")),
            "--only needs raw,sled"
        );
        // An earlier bad value is an error even when a later one is good.
        assert!(args("--n x --n 1")
            .number::<u64>("--n", "a number")
            .is_err());
    }

    #[test]
    fn a_value_may_look_like_a_flag() {
        let a = args("--only --quick");
        assert_eq!(a.mode(), Mode::Smoke);
        assert!(a
            .only("x")
            .is_ok_and(|o| o.wants("--quick") && !o.wants("raw")));
    }
}
