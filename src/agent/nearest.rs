//! What to say about a class name the model does not have: the few nearest names, not all of
//! them (a 36-class list repeated per file buried the one useful line).

/// Models with at most this many classes have them all listed.
const LIST_ALL_UP_TO: usize = 12;
/// At most this many suggestions.
const SUGGESTIONS: usize = 5;

/// The part of an unknown-class message after the name: the classes nearest to `wanted` by edit
/// distance (ignoring case), ties in the model's order; every class for a small model; the first
/// few when nothing is near.
pub fn class_hint(wanted: &str, classes: &[String]) -> String {
    if classes.len() <= LIST_ALL_UP_TO {
        return format!("this model's classes: {}", classes.join(", "));
    }
    let nearest = nearest(wanted, classes, SUGGESTIONS);
    if nearest.is_empty() {
        let first: Vec<&str> = classes.iter().take(LIST_ALL_UP_TO).map(String::as_str).collect();
        return format!("this model's {} classes start {}, ...", classes.len(), first.join(", "));
    }
    format!("nearest of this model's {} classes: {}", classes.len(), nearest.join(", "))
}

/// Up to `n` names that share something with `wanted` (an edit distance below the longer
/// length), nearest first, ties in the given order.
pub fn nearest<'a>(wanted: &str, names: &'a [String], n: usize) -> Vec<&'a str> {
    let wanted = wanted.to_lowercase();
    let mut scored: Vec<(usize, usize, &str)> = names
        .iter()
        .enumerate()
        .filter_map(|(index, name)| {
            let distance = edit_distance(&wanted, &name.to_lowercase());
            let longer = wanted.chars().count().max(name.chars().count());
            (distance < longer).then_some((distance, index, name.as_str()))
        })
        .collect();
    scored.sort_unstable();
    scored.into_iter().take(n).map(|(_, _, name)| name).collect()
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substituted = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substituted.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &str) -> Vec<String> {
        list.split(' ').map(str::to_string).collect()
    }

    fn fonts36() -> Vec<String> {
        "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ".chars().map(String::from).collect()
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("bolt", "bolt"), 0);
        assert_eq!(edit_distance("bolt", "b"), 3);
        assert_eq!(edit_distance("bolt", "0"), 4);
    }

    #[test]
    fn a_wrong_name_gets_the_few_nearest_classes() {
        assert_eq!(class_hint("bolt", &fonts36()), "nearest of this model's 36 classes: B, L, O, T");
        // Case is ignored; the exact match in another case comes first.
        assert_eq!(nearest("a", &fonts36(), 5), vec!["A"]);
        assert_eq!(nearest("blot", &names("nut screw bolt washer"), 1), vec!["bolt"]);
    }

    #[test]
    fn a_small_model_lists_every_class_and_a_name_far_from_all_gets_the_first_few() {
        assert_eq!(class_hint("zero", &names("cat dog bird")), "this model's classes: cat, dog, bird");
        assert_eq!(
            class_hint("%%", &fonts36()),
            "this model's 36 classes start 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, A, B, ..."
        );
    }
}
