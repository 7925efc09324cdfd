//! The one place where wire messages become domain values and back, so generated types stay at
//! the boundary.

use chrono::NaiveDate;

use crate::Error;
use crate::model::parse_date;
use crate::template::{Axis, TemplateRef, Value};
use crate::wire;

/// A wire parameter value as a typed domain value.
pub fn parameter_from_wire(parameter: &wire::ParameterValue) -> Result<(String, Value), Error> {
    use wire::parameter_value::Value as Wire;
    let invalid = |message: String| Error::Parameter {
        parameter: parameter.name.clone(),
        message,
    };
    let value = match &parameter.value {
        Some(Wire::Integer(value)) => Value::Integer(*value),
        Some(Wire::Float(value)) => Value::Float(*value),
        Some(Wire::Date(text)) => Value::Date(
            parse_date(text)
                .map_err(|_| invalid(format!("'{text}' is not a date (YYYY-MM-DD)")))?,
        ),
        Some(Wire::Category(name)) => Value::Category(name.clone()),
        Some(Wire::Categories(list)) => Value::Categories(list.values.clone()),
        None => return Err(invalid("has no value".into())),
    };
    Ok((parameter.name.clone(), value))
}

/// A typed domain value as a wire parameter value.
pub fn parameter_to_wire(name: &str, value: &Value) -> wire::ParameterValue {
    use wire::parameter_value::Value as Wire;
    let value = match value {
        Value::Integer(value) => Wire::Integer(*value),
        Value::Float(value) => Wire::Float(*value),
        Value::Date(date) => Wire::Date(format_date(*date)),
        Value::Category(name) => Wire::Category(name.clone()),
        Value::Categories(names) => Wire::Categories(wire::CategoryList {
            values: names.clone(),
        }),
    };
    wire::ParameterValue {
        name: name.to_string(),
        value: Some(value),
    }
}

fn format_date(date: NaiveDate) -> String {
    date.format("%Y-%m-%d").to_string()
}

impl From<&TemplateRef> for wire::TemplateRef {
    fn from(reference: &TemplateRef) -> wire::TemplateRef {
        wire::TemplateRef {
            id: reference.id.clone(),
            version: reference.version,
            content_hash: reference.content_hash.clone(),
        }
    }
}

impl From<&Axis> for wire::Axis {
    fn from(axis: &Axis) -> wire::Axis {
        wire::Axis {
            column: axis.column.clone(),
            levels: axis.levels.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_values_round_trip_through_the_wire() {
        let values = [
            Value::Integer(16),
            Value::Float(2.5),
            Value::Date(parse_date("2021-02-03").unwrap()),
            Value::Category("fall".into()),
            Value::Categories(vec!["fall".into(), "assault".into()]),
        ];
        for value in values {
            let wire = parameter_to_wire("p", &value);
            assert_eq!(
                parameter_from_wire(&wire).unwrap(),
                ("p".to_string(), value)
            );
        }
    }

    #[test]
    fn unparseable_date_names_the_parameter() {
        let wire = wire::ParameterValue {
            name: "from".into(),
            value: Some(wire::parameter_value::Value::Date("2021-13-01".into())),
        };
        let err = parameter_from_wire(&wire).unwrap_err().to_string();
        assert!(
            err.contains("'from'") && err.contains("2021-13-01"),
            "{err}"
        );
    }
}
