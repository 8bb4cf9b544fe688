DROP TABLE IF EXISTS data_archive;
DROP TABLE IF EXISTS deployment_history;
DROP TABLE IF EXISTS feature_flags;
