//! Which classes are "seen" (labelled on site) in a benchmark run.

use rand::SeedableRng;
use rand::seq::SliceRandom;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeenSpec {
    /// Class names, e.g. `0,2,4,6,8`.
    Names(Vec<String>),
    /// `count:K,seed:S`: K classes drawn with seed S.
    Draw { count: usize, seed: u64 },
}

impl std::str::FromStr for SeenSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<SeenSpec, String> {
        if text.starts_with("count:") {
            let mut count = None;
            let mut seed = 0;
            for part in text.split(',') {
                match part.split_once(':') {
                    Some(("count", v)) => {
                        count = Some(v.parse().map_err(|_| format!("'{text}': count '{v}' is not a number"))?)
                    }
                    Some(("seed", v)) => {
                        seed = v.parse().map_err(|_| format!("'{text}': seed '{v}' is not a number"))?
                    }
                    _ => return Err(format!("'{text}': expected count:K,seed:S")),
                }
            }
            let count = count.ok_or_else(|| format!("'{text}': missing count"))?;
            return Ok(SeenSpec::Draw { count, seed });
        }
        let names: Vec<String> = text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect();
        if names.is_empty() {
            return Err("the seen-class list is empty".into());
        }
        Ok(SeenSpec::Names(names))
    }
}

impl SeenSpec {
    /// Sorted class indices.
    pub fn resolve(&self, classes: &[String]) -> Result<Vec<usize>, String> {
        let mut indices = match self {
            SeenSpec::Names(names) => names
                .iter()
                .map(|name| classes.iter().position(|c| c == name).ok_or_else(|| format!("unknown class '{name}'")))
                .collect::<Result<Vec<_>, _>>()?,
            SeenSpec::Draw { count, seed } => {
                if *count < 2 || *count > classes.len() {
                    return Err(format!("count must be between 2 and {}, got {count}", classes.len()));
                }
                let mut all: Vec<usize> = (0..classes.len()).collect();
                all.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(*seed));
                all.truncate(*count);
                all
            }
        };
        indices.sort_unstable();
        indices.dedup();
        if indices.len() < 2 {
            return Err("adaptation needs at least two seen classes".into());
        }
        Ok(indices)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classes() -> Vec<String> {
        (0..10).map(|i| i.to_string()).collect()
    }

    #[test]
    fn names_and_draws_resolve_to_sorted_indices() {
        let spec: SeenSpec = "8,2,4".parse().unwrap();
        assert_eq!(spec.resolve(&classes()).unwrap(), vec![2, 4, 8]);
        let spec: SeenSpec = "count:4,seed:7".parse().unwrap();
        let drawn = spec.resolve(&classes()).unwrap();
        assert_eq!(drawn.len(), 4);
        assert_eq!(drawn, spec.resolve(&classes()).unwrap(), "the same seed draws the same classes");
        assert_ne!(drawn, "count:4,seed:8".parse::<SeenSpec>().unwrap().resolve(&classes()).unwrap());
    }

    #[test]
    fn bad_specs_are_explained() {
        assert!("2,x".parse::<SeenSpec>().unwrap().resolve(&classes()).unwrap_err().contains("'x'"));
        assert!("count:1".parse::<SeenSpec>().unwrap().resolve(&classes()).is_err());
        assert!("count:a".parse::<SeenSpec>().is_err());
        assert!("3".parse::<SeenSpec>().unwrap().resolve(&classes()).is_err());
    }
}
