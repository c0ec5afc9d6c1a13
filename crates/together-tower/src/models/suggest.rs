//! The known ids closest to a name: bounded work, whatever the name or the list.

/// How many close model ids a [`ModelNotFound`] names at most.
const SUGGESTIONS: usize = 3;

/// The longest model name (in characters) that gets suggestions, and the longest id
/// suggested. Together's ids are under 100 characters.
pub const MAX_NAME_CHARS: usize = 128;

/// How many ids of the models list are scored for suggestions at most: the first ones.
pub const MAX_CANDIDATES: usize = 1_000;

/// How many cells of edit-distance tables one 404's suggestions may fill. A hostile name stops
/// here with the best found so far: on the project's 2-core VM, a 128-character name against
/// 200 ids (which fills them all) took 0.37 ms per 404, and a typo 0.03 ms, as hopeless
/// candidates are abandoned early (`cargo bench -p together-tower --bench model_check`).
const MAX_CELLS: usize = 200_000;

/// The known ids closest to `model`, closest first: by edit distance, ignoring case, to the
/// whole id or to the name after its organisation (`meta-llama/`), whichever is closer.
///
/// Bounded work: no suggestions for a name over [`MAX_NAME_CHARS`], ids over it skipped, the
/// first [`MAX_CANDIDATES`] ids scored, each score abandoned once it cannot make the three
/// best, and no more than [`MAX_CELLS`] cells filled in all.
pub(super) fn closest(model: &str, known: &[String]) -> Vec<String> {
    if model.chars().count() > MAX_NAME_CHARS {
        return Vec::new();
    }
    let wanted: Vec<char> = model.to_lowercase().chars().collect();
    let wanted_name = after_organisation(&wanted);
    // The best so far, closest first; ties keep the list's order.
    let mut best: Vec<(usize, &String)> = Vec::with_capacity(SUGGESTIONS + 1);
    let mut id_chars = Vec::new();
    let mut budget = MAX_CELLS;
    for id in known.iter().take(MAX_CANDIDATES) {
        if budget == 0 {
            break;
        }
        if id.chars().count() > MAX_NAME_CHARS {
            continue;
        }
        id_chars.clear();
        id_chars.extend(id.to_lowercase().chars());
        // A candidate must beat the worst of a full top three to matter.
        let bound = match best.get(SUGGESTIONS - 1) {
            Some((worst, _)) => worst.saturating_sub(1),
            None => usize::MAX,
        };
        let whole = edit_distance_within(&wanted, &id_chars, bound, &mut budget);
        let bound = whole.map_or(bound, |distance| distance.min(bound));
        let id_name = after_organisation(&id_chars);
        let name = edit_distance_within(wanted_name, id_name, bound, &mut budget);
        let Some(distance) = whole.into_iter().chain(name).min() else {
            continue;
        };
        let at = best.partition_point(|(other, _)| *other <= distance);
        best.insert(at, (distance, id));
        best.truncate(SUGGESTIONS);
    }
    best.into_iter().map(|(_, id)| id.clone()).collect()
}

/// The part of an id after its organisation (`meta-llama/`), or all of it.
fn after_organisation(id: &[char]) -> &[char] {
    id.iter()
        .rposition(|&c| c == '/')
        .map_or(id, |slash| &id[slash + 1..])
}

/// Levenshtein distance over characters, in one row of memory; `None` once it must exceed
/// `limit`, so that a hopeless candidate costs little, or once it would fill more cells than
/// `budget` has left (each row taken from it).
fn edit_distance_within(a: &[char], b: &[char], limit: usize, budget: &mut usize) -> Option<usize> {
    if a.len().abs_diff(b.len()) > limit {
        return None;
    }
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        *budget = budget.checked_sub(b.len().max(1))?;
        let mut diagonal = row[0];
        row[0] = i + 1;
        let mut smallest = row[0];
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != cb));
            diagonal = above;
            smallest = smallest.min(row[j + 1]);
        }
        // Every later row is at least this row's smallest.
        if smallest > limit {
            return None;
        }
    }
    Some(row[b.len()]).filter(|distance| *distance <= limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_closest_ids_come_first() {
        let known: Vec<String> = [
            "meta-llama/Llama-3.3-70B-Instruct-Turbo",
            "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo",
            "mistralai/Mixtral-8x7B-Instruct-v0.1",
            "BAAI/bge-large-en-v1.5",
        ]
        .map(String::from)
        .into();
        let found = closest("meta-llama/llama-3.3-70b-instruct", &known);
        assert_eq!(found[0], "meta-llama/Llama-3.3-70B-Instruct-Turbo");
        assert_eq!(found.len(), 3);
        // Without the organisation, the name still finds it.
        assert_eq!(closest("Mixtral-8x7B-Instruct", &known)[0], known[2]);
        let chars = |text: &str| text.chars().collect::<Vec<_>>();
        let within = |a, b, limit| edit_distance_within(&chars(a), &chars(b), limit, &mut 1_000);
        assert_eq!(within("kitten", "sitting", usize::MAX), Some(3));
        assert_eq!(within("", "abc", usize::MAX), Some(3));
        assert_eq!(within("kitten", "sitting", 2), None);
        // Out of budget: no answer rather than more work.
        let mut budget = 10;
        assert_eq!(
            edit_distance_within(&chars("kitten"), &chars("sitting"), 9, &mut budget),
            None
        );
    }

    #[test]
    fn suggestions_are_bounded_work_whatever_the_name_or_list() {
        let known: Vec<String> = (0..100_000).map(|i| format!("org/model-{i}")).collect();
        // A name no id is that long gets none, without scoring anything.
        let huge = "m".repeat(512 * 1024);
        assert!(closest(&huge, &known).is_empty());
        // Only the first MAX_CANDIDATES ids are scored: an exact match beyond them is not seen.
        let found = closest("org/model-99999", &known);
        assert_eq!(found.len(), SUGGESTIONS);
        assert!(!found.contains(&"org/model-99999".to_owned()));
        assert_eq!(closest("org/model-42", &known)[0], "org/model-42");
        // Ids too long to be a model are never suggested.
        let long = vec!["x".repeat(MAX_NAME_CHARS + 1), "org/a".to_owned()];
        assert_eq!(closest("x", &long), ["org/a"]);
    }
}
